"""The built-in main job: generate with a tiny locally generated model, no download.

``python -m kunserve.demo`` writes a random Llama checkpoint with a trained BPE tokenizer to
``--model-dir`` (default ``~/.cache/kunserve/tiny-llama``), runs a batch of prompts through the
offline API under a deliberately small KV cache (so chunked prefill and preemption happen) and
prints the outputs with per-request timing and the engine's throughput.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kunserve import LLM, SamplingParams
from kunserve.models.tiny import make_tiny_checkpoint

PROMPTS = [
    "The quick brown fox",
    "A serving cluster runs",
    "Under a burst the KV cache",
    "Dropping replicated weights",
    "Pipeline stages pass hidden states",
    "Hello, how are you",
    "Once upon a time there was",
    "The lazy dog",
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache/kunserve/tiny-llama"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-kv-blocks", type=int, default=48)
    args = parser.parse_args(argv)

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        make_tiny_checkpoint(model_dir)
    llm = LLM(str(model_dir), num_kv_blocks=args.num_kv_blocks, block_size=16, max_model_len=256)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start

    for out in outputs[: len(PROMPTS)]:
        m = out.metrics
        print(f"{out.prompt!r:40} -> {out.outputs[0].text!r:.60}  (TTFT {m.ttft * 1e3:.0f} ms, "
              f"preempted {m.num_preemptions}x)")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    summary = {
        "requests": len(outputs),
        "output_tokens": num_tokens,
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(num_tokens / elapsed, 1),
        "preemptions": llm.engine.scheduler.num_preemptions,
    }
    print(f"\n{len(outputs)} requests, {num_tokens} tokens in {elapsed:.2f} s "
          f"({summary['output_tokens_per_s']} tok/s), {summary['preemptions']} preemptions")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
