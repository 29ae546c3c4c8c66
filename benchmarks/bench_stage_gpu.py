"""One pipeline stage's micro-batch on CUDA: the reference attention metadata (what pipeline
stages used before 2026-11-24) against the Triton path's (``pipeline_step.stage_inputs`` now), on the
first half of a Qwen-2.5-14B-shaped model with random bf16 weights (issue 11).

    python benchmarks/bench_stage_gpu.py [--out stage.json]

Prints one JSON line: median milliseconds of the stage's forward (metadata built outside the
timing) for a decode micro-batch and a chunked-prefill one, each way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from kunserve.bench._model_configs import write_model_config
from kunserve.config import EngineConfig
from kunserve.runtime.attention import AttentionMetadata
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.pipeline_step import StageChunk, stage_inputs


def reference_metadata(chunks, block_manager, device):
    return AttentionMetadata.build([c.num_tokens for c in chunks], [c.start + c.num_tokens for c in chunks],
                                   [block_manager.block_table(c.request_id) for c in chunks],
                                   block_manager.block_size, device)


def median_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model_dir = write_model_config("qwen2.5-14b", tempfile.mkdtemp())
    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda",
                                    num_kv_blocks=20_000, block_size=16, max_model_len=8192, layer_range=(0, 24)))
    cfg, bm, device = engine.model.config, engine.block_manager, engine.device
    cases = {
        "decode 128 x 2048 ctx": tuple(StageChunk(f"d{i}", 2047, 1, True, True) for i in range(128)),
        "prefill 4 x 512 at 1024": tuple(StageChunk(f"p{i}", 1024, 512, True, True) for i in range(4)),
    }
    result = {"bench": "stage_gpu", "device": torch.cuda.get_device_name(), "model": "qwen2.5-14b layers 0-24"}
    for name, chunks in cases.items():
        tokens = sum(c.num_tokens for c in chunks)
        x = torch.randint(0, cfg.vocab_size, (tokens,), device=device)
        triton_meta, positions, _rows = stage_inputs(chunks, bm, device, cfg)  # allocates the blocks
        ref_meta = reference_metadata(chunks, bm, device)
        with torch.inference_mode():
            result[name] = {
                "reference_ms": median_ms(lambda: engine.model(x, positions, engine.kv_cache.by_layer(), ref_meta)),
                "triton_ms": median_ms(lambda: engine.model(x, positions, engine.kv_cache.by_layer(), triton_meta)),
            }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
