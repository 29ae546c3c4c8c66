"""The engine on CUDA (run through the device tool; skipped on CPU-only machines).

On CUDA the engine runs the Triton attention kernels, the fused pointwise kernels and, unless
``enforce_eager``, CUDA graphs for decode steps; these tests hold that path to transformers.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, hf_greedy
from kunserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 45])]


@pytest.mark.parametrize("memory,eager", [("vmm", False), ("torch", False), ("vmm", True)])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_greedy_matches_transformers(tiny_checkpoints, arch, memory, eager):
    import transformers

    path = tiny_checkpoints[arch]
    reference = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval().cuda()
    llm = LLM(str(path), device="cuda", dtype="float32", memory=memory, num_kv_blocks=16, block_size=4,
              max_model_len=64, max_num_batched_tokens=16, enforce_eager=eager)
    assert (llm.engine.memory.unified is not None) == (memory == "vmm")
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    graphs = llm.engine.runner.cuda.graphs
    assert (graphs is None) == eager and (eager or graphs.num_replays > 0)
    for prompt, out in zip(PROMPTS, outputs):
        expected = reference.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected, prompt
    assert llm.engine.scheduler.num_preemptions > 0


def test_cuda_drop_and_restore_replica_keeps_outputs(llama_dir):
    from test_engine_vmm import place_replica_of_layer0, run

    llm = LLM(str(llama_dir), device="cuda", dtype="float32", memory="vmm", num_kv_blocks=16, block_size=4,
              max_model_len=64)
    engine = llm.engine
    reference = run(engine, PROMPTS[:8], GREEDY)
    saved = {n: p.clone() for n, p in place_replica_of_layer0(engine).items()}
    placement, unified = engine.memory.placement, engine.memory.unified

    def reload(_allocate):
        for name, param in saved.items():
            unified.layer_view("replica", placement.offsets[name], param.shape, param.dtype).copy_(param)

    def drop_then_restore(step):
        if step == 2:
            engine.drop_weights(["replica"])
        if step == 6:
            engine.restore_weights(["replica"], reload)

    assert run(engine, PROMPTS[:8], GREEDY, drop_then_restore) == reference
    assert engine.block_manager.num_blocks == 16


def _teacher_forced_logits(engine, sequences: list[list[int]], prompt_len: int, chunk: int) -> torch.Tensor:
    """Logits [B, len - prompt_len, vocab] at positions prompt_len - 1 .. len - 2 of every
    sequence: chunked prefill of the prompts (all sequences in each step), then one decode step
    per position feeding the sequence's own next token."""
    from kunserve.runtime.request import Request
    from kunserve.runtime.scheduler import ScheduledChunk, SchedulerOutput

    params = SamplingParams(temperature=0, ignore_eos=True)
    requests = [Request(f"t{i}", seq[:prompt_len], params, len(seq) + 1) for i, seq in enumerate(sequences)]
    needed = len(sequences[0]) - prompt_len  # logits rows per sequence (all sequences in lockstep)
    rows: list[list[torch.Tensor]] = [[] for _ in sequences]
    while len(rows[0]) < needed:
        chunks = []
        for r in requests:
            n = min(chunk, r.num_tokens - r.num_computed_tokens)
            engine.block_manager.allocate(r.request_id, r.num_computed_tokens + n)
            chunks.append(ScheduledChunk(r, n))
        logits, ids = engine.runner.cuda.logits(SchedulerOutput(tuple(chunks)))
        for row, rid in zip(logits, ids):
            rows[int(rid[1:])].append(row.float().clone())
        for c, seq, got in zip(chunks, sequences, rows):
            completes = c.completes
            c.request.num_computed_tokens += c.num_tokens
            if completes and len(got) < needed:
                c.request.token_ids.append(seq[c.request.num_tokens])  # teacher forcing
    for r in requests:
        engine.block_manager.free(r.request_id)
    return torch.stack([torch.stack(r) for r in rows])


@pytest.mark.parametrize("eager", [False, True])
def test_cuda_bf16_logits_within_bf16_tolerance_of_transformers(tmp_path_factory, eager):
    """A bigger random model (hidden 1024, 8 layers, GQA 16/4, transformers' own init): bf16
    logits of chunked prefill and (graph-replayed) decode steps are within bf16 tolerance of
    the fp32 reference, and no further from it than transformers' own bf16 forward."""
    import transformers

    from kunserve.models.tiny import tiny_hf_config

    path = tmp_path_factory.mktemp("bf16") / "llama"
    torch.manual_seed(3)
    config = tiny_hf_config("LlamaForCausalLM", vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 1000, (3, 60), generator=gen).tolist()
    prompt_len = 45
    hf = {dt: transformers.LlamaForCausalLM.from_pretrained(path, dtype=dt).eval().cuda()
          for dt in (torch.float32, torch.bfloat16)}
    with torch.inference_mode():
        full = {dt: m(torch.tensor(sequences, device="cuda")).logits.float() for dt, m in hf.items()}
    reference = full[torch.float32][:, prompt_len - 1:-1]  # [3, 15, vocab]
    theirs = full[torch.bfloat16][:, prompt_len - 1:-1]
    llm = LLM(str(path), device="cuda", dtype="bfloat16", num_kv_blocks=64, block_size=16, max_model_len=128,
              enforce_eager=eager, max_num_seqs=8)
    ours = _teacher_forced_logits(llm.engine, sequences, prompt_len, chunk=16)
    assert ours.shape == reference.shape and not ours.isnan().any()
    rel = lambda x: ((x - reference).norm() / reference.norm()).item()  # noqa: E731
    assert rel(ours) < 2e-2 and rel(ours) <= 1.5 * rel(theirs) + 2e-3, (rel(ours), rel(theirs))
