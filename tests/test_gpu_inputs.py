"""Host-side parts of the CUDA path, checked on the CPU: step arrays, prefill tiles, merged q/k/v."""

from __future__ import annotations

import numpy as np
import torch

from kunserve import LLM, SamplingParams
from kunserve.runtime.attention import AttentionMetadata
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.gpu_inputs import BlockTableCache, HostStep, _padded_tables, prefill_tiles
from kunserve.runtime.model_runner import merge_qkv_weights
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import ScheduledChunk


def _mixed_plan():
    """A decode row, a fresh prompt, a chunk after a cached prefix and an unfinished chunk."""
    manager = BlockManager(64, 4)
    for rid in ("warm", "other"):  # take some blocks first so tables are not 0, 1, 2, ...
        manager.allocate(rid, 9)
    specs = [("d", 20, 19, 1), ("p", 7, 0, 7), ("c", 22, 12, 10), ("u", 40, 0, 13)]  # id, tokens, done, chunk
    chunks = []
    for rid, n, done, size in specs:
        request = Request(rid, list(range(100 + n, 100 + 2 * n)), SamplingParams(), 64)
        request.num_computed_tokens = done
        manager.allocate(rid, done + size)
        chunks.append(ScheduledChunk(request, size))
    return chunks, manager


def test_host_step_matches_reference_metadata():
    chunks, manager = _mixed_plan()
    step = HostStep.build(chunks, manager)
    qlens = [c.num_tokens for c in chunks]
    ctx = [c.request.num_computed_tokens + c.num_tokens for c in chunks]
    tables = [manager.block_table(c.request.request_id) for c in chunks]
    reference = AttentionMetadata.build(qlens, ctx, tables, 4, torch.device("cpu"))
    assert step.slots.tolist() == (reference.slot_blocks * 4 + reference.slot_offsets).tolist()
    expected_ids = [t for c in chunks for t in c.request.token_ids[c.request.num_computed_tokens:][:c.num_tokens]]
    assert step.ids.tolist() == expected_ids
    assert step.positions.tolist() == [p for c, n in zip(ctx, qlens) for p in range(c - n, c)]
    assert step.context_lens.tolist() == ctx and step.query_start.tolist() == [0, 1, 8, 18, 31]
    assert step.sampling_ids == ("d", "p", "c") and step.logits_rows.tolist() == [0, 7, 17]
    for row, table in enumerate(tables):
        assert step.tables[row, : len(table)].tolist() == table and not step.tables[row, len(table):].any()
    assert not step.is_decode


def test_prefill_tiles_cover_every_query_once():
    query_start = np.array([0, 1, 8, 18, 31])
    tile_seq, tile_first = prefill_tiles(query_start, 4)
    covered = [(s, q) for s, f in zip(tile_seq, tile_first) for q in range(f, f + 4)
               if q < query_start[s + 1] - query_start[s]]
    assert covered == [(s, q) for s in range(4) for q in range(query_start[s + 1] - query_start[s])]


def test_merged_qkv_view_keeps_greedy_outputs(llama_dir):
    prompts = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 5, 13, 31])]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", memory="vmm", num_kv_blocks=16, block_size=4, max_model_len=64)
    reference = LLM(str(llama_dir), **kwargs).generate(prompts, greedy, use_tqdm=False)
    reference = [o.outputs[0].token_ids for o in reference]
    llm = LLM(str(llama_dir), **kwargs)
    assert merge_qkv_weights(llm.engine.model, llm.engine.memory.placement) == len(llm.engine.model.layer_ids)
    attn = llm.engine.model.model.layers["0"].self_attn
    assert torch.equal(attn.qkv_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == reference


def test_block_table_cache_follows_the_block_manager():
    """Growth, free + re-allocation under the same id, eviction and a remap, against a rebuild."""
    rng = np.random.default_rng(0)
    manager = BlockManager(400, 4)
    cache = BlockTableCache(rows=12, width=40)
    storage = torch.zeros(1)
    lengths = {f"r{i}": 0 for i in range(10)}
    for step in range(200):
        if step == 120:
            storage = torch.zeros(1)  # a KV remap: the cache starts over
        live = sorted(rng.choice(sorted(lengths), size=rng.integers(1, 7), replace=False).tolist())
        for rid in live:
            if lengths[rid] >= 150 or rng.random() < 0.05:
                manager.free(rid)
                lengths[rid] = 0
            lengths[rid] += int(rng.integers(1, 6))
            manager.allocate(rid, lengths[rid])
        cache.reset_if_remapped(storage)
        tables = [manager.block_table(rid) for rid in live]
        assert np.array_equal(cache.gather(live, tables), _padded_tables(tables)), step
