"""The engine on CUDA (run through the device tool; skipped on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, hf_greedy
from kunserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 45])]


@pytest.mark.parametrize("memory", ["vmm", "torch"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_greedy_matches_transformers(tiny_checkpoints, arch, memory):
    import transformers

    path = tiny_checkpoints[arch]
    reference = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval().cuda()
    llm = LLM(str(path), device="cuda", dtype="float32", memory=memory, num_kv_blocks=16, block_size=4,
              max_model_len=64, max_num_batched_tokens=16)
    assert (llm.engine.memory.unified is not None) == (memory == "vmm")
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
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
