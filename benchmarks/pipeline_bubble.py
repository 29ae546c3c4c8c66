"""Pipeline bubbles of a 2-stage group under a burst: one micro-batch per step vs token-budget
(Sarathi-style) vs lookahead (equal-cost halves under the fitted cost model), each with the
group's steps overlapped across stages (``--pipeline-overlap on``) and in lockstep (off), issue 7.

    python benchmarks/pipeline_bubble.py [--hidden 256] [--layers 4] [--num-prompts 48] [--overlap on off]

A random Llama of the given size is written with transformers, profiled on this CPU with
``python -m kunserve.profile`` (the lookahead policy's cost model and MIN tokens), then served by
``torchrun -m kunserve.serve --policy vllm-pp`` (2 ranks, one static 2-stage pipeline; or
``--serve-policy kunserve``: two instances that merge into a 2-stage group under the burst) under
each micro-batch policy while ``kunserve.bench serve`` sends the burst over HTTP. The bubble is
the idle share of the stages' step time (``kunserve_pipeline_bubble_fraction``): every stage
reports its compute seconds per step and the leader the step's wall time. Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from kunserve.bench import serve as serve_bench
from kunserve.bench._launch import LocalCluster
from kunserve.models.tiny import make_tiny_checkpoint

POLICIES = ("none", "token-budget", "lookahead")


def pipeline_metrics(base_url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("kunserve_pipeline_"):
            name, value = line.rsplit(" ", 1)
            values[name.removeprefix("kunserve_")] = float(value)
    return values


def run_policy(model: Path, profile: Path, policy: str, overlap: str, args) -> dict:
    serve_args = ["--policy", args.serve_policy, "--micro-batching", policy, "--pipeline-overlap", overlap, "--block-size", "16",
                  "--max-model-len", str(2 * args.input_len + args.output_len),  # len-jitter 0.5 stays inside
                  "--max-num-batched-tokens", str(args.budget), "--num-kv-blocks", str(args.kv_blocks)]
    if policy == "token-budget":
        serve_args += ["--micro-batch-tokens", str(args.micro_batch_tokens or args.budget // 2)]
    if policy == "lookahead":
        serve_args += ["--cost-profile", str(profile)]
    if args.step_log_dir is not None:
        args.step_log_dir.mkdir(parents=True, exist_ok=True)
        serve_args += ["--pipeline-step-log", str(args.step_log_dir / f"{policy}-overlap-{overlap}.jsonl")]
    if args.serve_policy == "kunserve":  # the group lives until the burst is served
        serve_args += ["--restore-hold-s", "600"]
    cluster = LocalCluster(model, 2, serve_args, served_model_name="m", log_level="WARNING")
    try:
        with cluster.pinned_to_cores() if args.pin_cores else contextlib.nullcontext() as pinned:
            if pinned:
                print(f"pinned rank -> core: {pinned}, load client on rank 0's core")
            bench = serve_bench.parse_args([
                "--base-url", cluster.base_url, "--model", "m", "--num-prompts", str(args.num_prompts),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--len-jitter", "0.5",
                "--vocab-size", "300", "--seed", "3"])
            metrics = serve_bench.run(bench)
            return {**metrics, "pipeline": pipeline_metrics(cluster.base_url)}
    finally:
        cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=384)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--budget", type=int, default=2048, help="--max-num-batched-tokens of the group")
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="token-budget's micro-batch size (default: half of --budget)")
    p.add_argument("--profile", type=Path, default=None, help="reuse a profile JSON instead of profiling")
    p.add_argument("--overlap", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="--pipeline-overlap settings to run (on: steps in flight across stages; off: lockstep)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--serve-policy", default="vllm-pp", choices=["vllm-pp", "kunserve"],
                   help="vllm-pp: one static 2-stage pipeline; kunserve: 2 instances that merge into one when "
                        "the burst overloads them (give a small --kv-blocks), measured over the group's steps")
    p.add_argument("--step-log-dir", type=Path, default=None,
                   help="write each run's --pipeline-step-log (one JSON line per group step) into this folder")
    p.add_argument("--pin-cores", action="store_true",
                   help="pin each rank to its own core and the load client to rank 0's "
                        "(LocalCluster.pinned_to_cores)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kunserve-bubble-"))
    model = make_tiny_checkpoint(work / "model", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                                 num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096)
    profile = args.profile
    if profile is None:
        profile = work / "profile.json"
        subprocess.run([sys.executable, "-m", "kunserve.profile", "--model", str(model), "--out", str(profile),
                        "--max-batch-tokens", str(args.budget), "--max-context", str(2 * args.input_len + args.output_len)],
                       check=True)
    rows = {f"{policy}/overlap-{overlap}": run_policy(model, profile, policy, overlap, args)
            for overlap in args.overlap for policy in args.policies}
    print(f"\n{'micro-batching':>24} {'bubble':>7} {'idle r0':>8} {'idle r1':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'tok/s':>7}")
    for policy, m in rows.items():
        pm = m["pipeline"]
        idle = [pm.get(f'pipeline_idle_fraction{{rank="{r}"}}', 0.0) for r in (0, 1)]
        print(f"{policy:>24} {pm['pipeline_bubble_fraction']:>7.1%} {idle[0]:>8.1%} {idle[1]:>8.1%} "
              f"{m['ttft_s']['median'] * 1e3:>9.1f} {m['ttft_s']['p99'] * 1e3:>9.1f} {m['tpot_s']['median'] * 1e3:>9.1f} "
              f"{m['output_throughput']:>7.1f}")
    print(json.dumps({"bench": "pipeline_bubble", **{k: str(v) for k, v in vars(args).items()},
                      "profile": json.loads(profile.read_text()).get("min_tokens"), "results": rows}))


if __name__ == "__main__":
    main()
