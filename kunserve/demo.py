"""The built-in main job: a load burst on a 2-rank CPU cluster, kunserve vs the vllm policy.

``python -m kunserve.demo`` writes a random Llama checkpoint with a trained BPE tokenizer to
``--model-dir`` (default ``~/.cache/kunserve/tiny-llama``), then runs ``kunserve.bench compare``:
the same on/off burst (a trickle, a burst that overloads a deliberately small KV pool, a trickle,
a smaller burst) against a fresh ``torchrun -m kunserve.serve`` cluster per policy. It prints the
comparison table, whether kunserve dropped weights, the P99 TTFT ratio, and writes the figures
(timeline, latency CDFs, SLO scales) to ``--out``. No download; a minute or two on 2 cores.

``python -m kunserve.demo --offline`` runs the earlier demo instead: a batch of prompts through
the offline API under a small KV cache (chunked prefill and preemption), with per-request timing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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

# A pool of 16 blocks x 4 tokens per instance holds ~6 requests of 24 + 16 tokens, so a burst of
# tens of requests overloads it; the tiny model's weights are far larger than that pool, so
# dropping a replica multiplies the KV capacity (the effect the paper measures on real GPUs).
BURST_ARGS = ["--num-kv-blocks", "16", "--block-size", "4", "--max-model-len", "64",
              "--max-num-batched-tokens", "64", "--restore-hold-s", "1",
              "--synthetic", "onoff", "--request-rate", "4", "--burst-rate", "400", "--off-s", "2",
              "--on-s", "0.15", "--input-len", "24", "--output-len", "16"]


def ensure_model(model_dir: Path) -> Path:
    if not (model_dir / "config.json").exists():
        make_tiny_checkpoint(model_dir)
    return model_dir


def run_burst(args) -> dict:
    from kunserve.bench import compare

    argv = ["--policies", "vllm", "kunserve", "--model", str(args.model_dir), "--ranks", str(args.ranks),
            "--num-prompts", str(args.num_prompts or 80), "--out", args.out, *BURST_ARGS]
    result = compare.run(compare.parse_args(argv))
    drops = result["summary"]["kunserve"]["drops"]
    restores = result["summary"]["kunserve"]["restores"]
    ratio = result["p99_ttft_ratio"]
    print(f"\nkunserve dropped weights {drops} time(s) and restored {restores} time(s) during the run; "
          f"P99 TTFT vllm / kunserve = {ratio:.2f}x "
          f"({'kunserve lower' if ratio > 1 else 'kunserve NOT lower'}).")
    summary = {"drops": drops, "restores": restores, "p99_ttft_ratio": ratio,
               "figures": [str(f) for f in result["figures"]]}
    print(json.dumps(summary))
    return summary


def run_offline(args) -> dict:
    from kunserve import LLM, SamplingParams

    llm = LLM(str(args.model_dir), num_kv_blocks=args.num_kv_blocks or 48, block_size=16, max_model_len=256)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts or 64)]
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/kunserve/tiny-llama")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 80 (burst), 64 (offline)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="kunserve-demo", help="where the table, JSON and figures go")
    parser.add_argument("--offline", action="store_true", help="run the offline generation demo instead")
    parser.add_argument("--max-tokens", type=int, default=32, help="offline demo only")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="offline demo only (default 48)")
    args = parser.parse_args(argv)
    ensure_model(args.model_dir)
    return run_offline(args) if args.offline else run_burst(args)


if __name__ == "__main__":
    main()
