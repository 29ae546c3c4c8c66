"""A pipeline group's stages on CUDA, in one process (run through the device tool; skipped on
CPU-only machines): each stage builds the Triton attention metadata of its micro-batches from its
own block tables (``pipeline_step.stage_inputs``), as a single instance's eager path does, and the
two layer slices chained by hand give the whole model's greedy tokens. (Two ranks with NCCL need
two GPUs; the torchrun tests in test_pipeline_serve.py cover that where they are lent.)"""

from __future__ import annotations

import pytest
import torch

from kunserve import LLM, SamplingParams
from kunserve.config import EngineConfig
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.pipeline_step import StageChunk, stage_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 5, 13, 24, 45])]
STEPS = 8


def test_two_stage_slices_on_cuda_give_the_whole_models_greedy_tokens(llama_dir):
    from kunserve.runtime.triton_attention import TritonAttentionMetadata  # Triton: CUDA installs only

    reference = LLM(str(llama_dir), device="cuda", dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in reference.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True), use_tqdm=False)]
    num_layers = reference.engine.model.config.num_layers
    del reference
    stages = [LLMEngine(EngineConfig(model=str(llama_dir), device="cuda", dtype="float32", num_kv_blocks=64,
                                     block_size=4, max_model_len=64, layer_range=cut))
              for cut in ((0, num_layers // 2), (num_layers // 2, num_layers))]
    tokens = [list(p) for p in PROMPTS]
    done = [0] * len(PROMPTS)  # tokens of each sequence in the KV cache
    for _ in range(STEPS):
        # one micro-batch: every sequence's uncomputed tokens (the prompts, then one decode each)
        chunks = tuple(StageChunk(str(i), done[i], len(t) - done[i], True, True) for i, t in enumerate(tokens))
        ids = [tok for i, t in enumerate(tokens) for tok in t[done[i]:]]
        hidden = None
        for k, engine in enumerate(stages):
            meta, positions, rows = stage_inputs(chunks, engine.block_manager, engine.device, engine.model.config)
            assert isinstance(meta, TritonAttentionMetadata)
            x = torch.tensor(ids, dtype=torch.long, device="cuda") if k == 0 else hidden
            hidden = engine.model(x, positions, engine.kv_cache.by_layer(), meta)  # [T, hidden]
        greedy = stages[-1].model.compute_logits(hidden[rows]).argmax(dim=-1).tolist()
        for i, t in enumerate(tokens):
            done[i] = len(t)
            t.append(greedy[i])
    assert [t[len(p):] for t, p in zip(tokens, PROMPTS)] == expected
