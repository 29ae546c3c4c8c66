"""A burst on a 2-rank CPU cluster: the vllm policy (recompute preemption) vs kunserve (drop).

    python benchmarks/drop_burst.py [--num-prompts 64] [--input-len 24] [--output-len 16]

Real ``torchrun -m kunserve.serve`` clusters on loopback with a deliberately small KV pool, so
the burst overloads it; ``kunserve.bench serve`` sends every request at once over HTTP. Prints
a table (TTFT/TPOT percentiles, drops, merge pause, exchanged requests with KV bytes and stall
per request, queued requests that ran during an exchange, and the restore that follows once
the load is over: weight bytes pulled back in rounds, the split's pause), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from kunserve.bench import serve as serve_bench
from kunserve.bench._launch import LocalCluster
from kunserve.bench.compare import parse_prometheus
from kunserve.models.tiny import make_tiny_checkpoint

POOL = ["--num-kv-blocks", "16", "--block-size", "4", "--max-model-len", "64", "--max-num-batched-tokens", "64"]


def counters(base_url: str) -> dict[str, float]:
    """Every /metrics series summed over its labels."""
    return {name: sum(series.values()) for name, series in parse_prometheus(httpx.get(f"{base_url}/metrics").text).items()}


def run_policy(model: Path, policy: str, args) -> dict:
    extra = [] if args.exchange_chunk_bytes is None else ["--exchange-chunk-bytes", str(args.exchange_chunk_bytes)]
    cluster = LocalCluster(model, args.ranks, [*POOL, "--policy", policy, "--restore-hold-s", "1", *extra],
                           served_model_name="tiny", log_level="WARNING")
    try:
        bench = serve_bench.parse_args([
            "--base-url", cluster.base_url, "--model", "tiny", "--num-prompts", str(args.num_prompts),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len)])
        metrics = serve_bench.run(bench)
        after_load = counters(cluster.base_url)
        deadline = time.monotonic() + 20  # load is over: the idle cluster restores on its own
        while policy == "kunserve" and after_load.get("restores_total", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            after_load = counters(cluster.base_url)
        return {**metrics, "counters": after_load}
    finally:
        cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=24)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=None, help="a random Llama of this width instead of the tiny one")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--exchange-chunk-bytes", type=int, default=None,
                   help="per link and round (small: the exchange runs over many pipeline steps)")
    p.add_argument("--policies", nargs="+", default=["vllm", "kunserve"], choices=["vllm", "kunserve"])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    if args.hidden is None:
        model = make_tiny_checkpoint(work / "tiny")
    else:
        model = make_tiny_checkpoint(work / "model", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                                     num_key_value_heads=max(1, args.hidden // 128))
    rows = {policy: run_policy(model, policy, args) for policy in args.policies}
    print(f"\n{'policy':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'req/s':>7} {'drops':>6} "
          f"{'pause ms':>9} {'detect->cap ms':>15} {'exch req':>8} {'KB/req':>7} {'stall max ms':>12} "
          f"{'overlap':>7} {'preempt':>8} {'restores':>8} {'pulled KB':>9} {'split ms':>8} {'bubble':>7}")
    for policy, m in rows.items():
        c = m["counters"]
        exchanged = c.get("exchanged_requests_total", 0)
        per_request = c.get("kv_bytes_exchanged_total", 0) / exchanged / 1024 if exchanged else 0.0
        print(f"{policy:>9} {m['ttft_s']['median'] * 1e3:>9.1f} {m['ttft_s']['p99'] * 1e3:>9.1f} "
              f"{m['tpot_s']['median'] * 1e3:>9.1f} {m['request_throughput']:>7.1f} {c.get('drops_total', 0):>6.0f} "
              f"{c.get('drop_merge_pause_seconds', 0) * 1e3:>9.1f} "
              f"{c.get('drop_detect_to_capacity_seconds', 0) * 1e3:>15.1f} {exchanged:>8.0f} {per_request:>7.1f} "
              f"{c.get('exchange_stall_seconds_max', 0) * 1e3:>12.1f} "
              f"{c.get('exchange_overlapped_requests_total', 0):>7.0f} {c.get('preemptions_total', 0):>8.0f} "
              f"{c.get('restores_total', 0):>8.0f} {c.get('restore_bytes_total', 0) / 1024:>9.0f} "
              f"{c.get('restore_seconds', 0) * 1e3:>8.1f} {c.get('pipeline_bubble_fraction', 0):>7.1%}")
    ratio = None
    if len(rows) == 2:
        ratio = rows["vllm"]["ttft_s"]["p99"] / rows["kunserve"]["ttft_s"]["p99"]
        print(f"P99 TTFT vllm / kunserve: {ratio:.2f}x")
    print(json.dumps({"bench": "drop_burst", **vars(args), "p99_ttft_ratio": ratio, "results": rows}))


if __name__ == "__main__":
    main()
