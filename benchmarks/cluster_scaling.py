"""Throughput and TTFT of a 1-rank vs a 2-rank CPU cluster under the same burst (issue 5).

    python benchmarks/cluster_scaling.py [--num-prompts 128] [--input-len 64] [--output-len 32]

Each configuration is a real ``torchrun -m kunserve.serve`` cluster on loopback, loaded by
``kunserve.bench serve`` over HTTP with streaming. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kunserve.bench import serve as serve_bench
from kunserve.bench._launch import LocalCluster
from kunserve.models.tiny import make_tiny_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    model = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    rows = {}
    for nproc in args.ranks:
        cluster = LocalCluster(model, nproc, ["--max-model-len", "256", "--num-kv-blocks", "256"],
                               served_model_name="tiny", log_level="WARNING")
        try:
            bench_args = serve_bench.parse_args([
                "--base-url", cluster.base_url, "--model", "tiny", "--num-prompts", str(args.num_prompts),
                "--input-len", str(args.input_len), "--output-len", str(args.output_len)])
            rows[nproc] = serve_bench.run(bench_args)
        finally:
            cluster.stop()
    print(f"\n{'ranks':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT mean ms':>13} {'TTFT p99 ms':>12} {'TPOT mean ms':>13}")
    for nproc, m in rows.items():
        print(f"{nproc:>5} {m['request_throughput']:>8.2f} {m['output_throughput']:>10.1f} "
              f"{m['ttft_s']['mean'] * 1e3:>13.1f} {m['ttft_s']['p99'] * 1e3:>12.1f} {m['tpot_s']['mean'] * 1e3:>13.1f}")
    print(json.dumps({"bench": "cluster_scaling", **vars(args), "results": {str(k): v for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
