"""The engine on the unified allocator (host backend): weights and KV share physical chunks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import hf_greedy, hf_model
from kunserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[1 + (5 * i + 11 * j) % 300 for j in range(n)] for i, n in enumerate([3, 6, 9, 12, 15, 18, 21, 24])]


@pytest.fixture(scope="module")
def expected(llama_dir):
    reference = hf_model(llama_dir, "LlamaForCausalLM")
    return [hf_greedy(reference, p, GREEDY.max_tokens) for p in PROMPTS]


def small_llm(llama_dir, memory="vmm"):
    # 16 blocks x 4 tokens: the 8 prompts cannot all run at once, so requests are preempted.
    # The host backend on purpose (also on a GPU machine: tests/test_vmm_cuda.py covers CUDA).
    return LLM(str(llama_dir), num_kv_blocks=16, block_size=4, max_model_len=64, memory=memory, device="cpu")


def place_replica_of_layer0(engine):
    """A weight unit the instance holds but does not execute (a replica of layer 0)."""
    placement = engine.memory.placement
    engine.memory.unified.place_layer("replica", placement.unit_bytes[0])
    layer0 = {n: p for n, p in engine.model.named_parameters() if n.startswith("model.layers.0.")}
    for name, param in layer0.items():
        view = engine.memory.unified.layer_view("replica", placement.offsets[name], param.shape, param.dtype)
        view.copy_(param)
    return layer0


def run(engine, prompts, params, on_step=None):
    ids = [engine.add_request(p, params) for p in prompts]
    done, step = {}, 0
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
        if on_step:
            on_step(step)
    return [done[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize("memory", ["vmm", "torch"])
def test_both_allocators_match_transformers(llama_dir, expected, memory):
    llm = small_llm(llama_dir, memory)
    assert (llm.engine.memory.unified is not None) == (memory == "vmm")
    assert run(llm.engine, PROMPTS, GREEDY) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_weights_live_in_unified_memory(llama_dir):
    engine = small_llm(llama_dir).engine
    reference = load_file(llama_dir / "model.safetensors")
    unified = engine.memory.unified
    assert set(engine.memory.placement.unit_bytes) == {0, 1, 2, 3, "embed", "head"}
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, reference[name])
    # The parameter is a view of its unit's slot: writing through the allocator shows in it.
    param = engine.model.model.layers["2"].mlp.up_proj.weight
    offset = engine.memory.placement.offsets["model.layers.2.mlp.up_proj.weight"]
    unified.layer_view(2, offset, (1,), param.dtype).fill_(123.0)
    assert param.view(-1)[0].item() == 123.0


def test_drop_mid_run_grows_cache_as_predicted_and_keeps_outputs(llama_dir, expected):
    engine = small_llm(llama_dir).engine
    place_replica_of_layer0(engine)
    unit_bytes = engine.memory.placement.unit_bytes[0]
    granularity = engine.memory.unified.backend.granularity
    predicted = 16 + (-(-unit_bytes // granularity) * granularity) // engine.memory.block_bytes
    counts = []

    def drop_at_step_3(step):
        if step == 3:
            counts.append(engine.drop_weights(["replica"]))

    preemptions_before = engine.scheduler.num_preemptions
    assert run(engine, PROMPTS, GREEDY, drop_at_step_3) == expected
    assert counts == [predicted] and engine.block_manager.num_blocks == predicted
    assert engine.kv_cache.num_blocks == predicted and engine.block_manager.num_free_blocks == predicted
    assert engine.scheduler.num_preemptions >= preemptions_before


def test_restore_mid_run_moves_tail_blocks_and_reloads_bit_identical(llama_dir, expected):
    engine = small_llm(llama_dir).engine
    layer0 = place_replica_of_layer0(engine)
    saved = {n: p.clone() for n, p in layer0.items()}
    engine.drop_weights(["replica"])
    grown = engine.block_manager.num_blocks
    placement, unified = engine.memory.placement, engine.memory.unified
    on_tail = []

    def reload(_allocate):
        checkpoint = load_file(llama_dir / "model.safetensors")
        for name, param in saved.items():
            unified.layer_view("replica", placement.offsets[name], param.shape, param.dtype).copy_(checkpoint[name])

    def restore_at_step_4(step):
        if step == 4:
            tables = [engine.block_manager.block_table(r) for r in engine.requests]
            on_tail.append(any(b >= 16 for t in tables for b in t))
            engine.restore_weights(["replica"], reload)

    assert run(engine, PROMPTS, GREEDY, restore_at_step_4) == expected
    assert grown > 16 and on_tail == [True]  # requests really sat on the blocks given back
    assert engine.block_manager.num_blocks == 16 and engine.kv_cache.num_blocks == 16
    for name, param in saved.items():
        restored = unified.layer_view("replica", placement.offsets[name], param.shape, param.dtype)
        assert torch.equal(restored, param), name


def test_dropping_executed_or_plain_weights_is_refused(llama_dir):
    engine = small_llm(llama_dir).engine
    with pytest.raises(ValueError, match=r"weight units \[1\] are still executed by this instance"):
        engine.drop_weights([1])
    plain = small_llm(llama_dir, memory="torch").engine
    with pytest.raises(ValueError, match="only with the unified allocator"):
        plain.drop_weights(["x"])
