"""``python -m kunserve.sim``: simulate a serving cluster on a trace (results are simulation).

    python -m kunserve.sim --policy kunserve --instances 8 --model qwen2.5-14b --gpu h100-80gb \\
        --link rdma-200 --trace azure-conv --trace-duration-s 600 --target-demand 0.6 --out sim-out
    python -m kunserve.sim --compare --policies vllm vllm-pp swap llumnix kunserve ... --plots

Writes ``summary.json`` and ``table.txt`` (and with ``--plots`` the bench's PNG figures) to
``--out``, and prints the table. The workload options are the bench's (``kunserve.bench.workload``);
``--trace azure-conv`` / ``azure-code`` name the Azure traces shipped in kunserve/data/traces.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kunserve.bench.workload import add_workload_args, build_workload
from kunserve.sim.config import MICRO_BATCHING, PIPELINE_MODELS, POLICIES, SimConfig
from kunserve.sim.hardware import GPUS, LINKS

TRACE_ALIASES = {"azure-conv": "AzureLLMInferenceTrace_conv.csv", "azure-code": "AzureLLMInferenceTrace_code.csv"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kunserve.sim", description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="kunserve", choices=POLICIES)
    p.add_argument("--compare", action="store_true", help="run every --policies on the same workload, print a table")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--model", default="qwen2.5-14b", help="qwen2.5-14b, qwen2.5-72b, llama3-8b or a model directory")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--tp", type=int, default=1, help="GPUs per instance (tensor parallel)")
    p.add_argument("--link", default="rdma-200", choices=sorted(LINKS))
    p.add_argument("--swap-link", default="pcie-gen5", choices=sorted(LINKS))
    p.add_argument("--profile", default=None,
                   help="fitted cost model JSON (python -m kunserve.profile); default: the GPU roofline")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply the profile's step times")
    p.add_argument("--step-overhead-s", type=float, default=None)
    p.add_argument("--overhead-per-seq-s", type=float, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="trace lengths are clipped to it (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="per instance; default: from memory")
    p.add_argument("--weight-granularity", type=int, default=2 << 20)
    p.add_argument("--pipeline-size", type=int, default=2, help="vllm-pp stages")
    p.add_argument("--micro-batching", default="auto", choices=MICRO_BATCHING)
    p.add_argument("--micro-batch-tokens", type=int, default=None)
    p.add_argument("--no-pipeline-overlap", action="store_true",
                   help="a pipeline step starts when the previous one is back (lockstep: no steps in flight)")
    p.add_argument("--pipeline-model", default="sets", choices=PIPELINE_MODELS,
                   help="overlapped pipelines: sets = the runtime's request sets, stepped exactly (default); "
                        "analytic = each group step at its steady state (faster: decode stretches fast-forward)")
    p.add_argument("--swap-space-bytes", type=int, default=4 << 30)
    p.add_argument("--swap-bytes-per-step", type=int, default=512 << 20)
    p.add_argument("--restore-fraction", type=float, default=0.5)
    p.add_argument("--min-hold-s", type=float, default=5.0)
    p.add_argument("--max-group-size", type=int, default=None)
    p.add_argument("--exchange-chunk-s", type=float, default=0.1)
    p.add_argument("--no-exchange-overlap", action="store_true", help="exchange rounds add to steps (uncoordinated)")
    p.add_argument("--monitor-interval-s", type=float, default=0.05)
    p.add_argument("--exact", action="store_true", help="step every unit step by step (no fast-forwarding)")
    p.add_argument("--lockstep", action="store_true", help="step all units together (the CPU runtime); implies --exact")
    p.add_argument("--lockstep-overhead-s", type=float, default=0.0)
    p.add_argument("--client-latency-s", type=float, default=0.0)
    p.add_argument("--no-token-times", action="store_true", help="keep first/last token times only (no ITL)")
    p.add_argument("--out", default="kunserve-sim")
    p.add_argument("--plots", action="store_true")
    add_workload_args(p, synthetic="onoff")
    args = p.parse_args(argv)
    args.trace = TRACE_ALIASES.get(args.trace, args.trace)
    return args


def config_for(args: argparse.Namespace, policy: str) -> SimConfig:
    return SimConfig(
        policy=policy, instances=args.instances, model=args.model, gpu=args.gpu, tp=args.tp, link=args.link,
        swap_link=args.swap_link, profile=args.profile, time_scale=args.time_scale,
        step_overhead_s=args.step_overhead_s, overhead_per_seq_s=args.overhead_per_seq_s,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        weight_granularity=args.weight_granularity, pipeline_size=args.pipeline_size,
        micro_batching=args.micro_batching, micro_batch_tokens=args.micro_batch_tokens,
        pipeline_overlap=not args.no_pipeline_overlap, pipeline_model=args.pipeline_model,
        swap_space_bytes=args.swap_space_bytes, swap_bytes_per_step=args.swap_bytes_per_step,
        restore_fraction=args.restore_fraction, min_hold_s=args.min_hold_s, max_group_size=args.max_group_size,
        exchange_chunk_s=args.exchange_chunk_s, exchange_overlap=not args.no_exchange_overlap,
        monitor_interval_s=args.monitor_interval_s, fast_forward=not (args.exact or args.lockstep),
        lockstep=args.lockstep, lockstep_overhead_s=args.lockstep_overhead_s,
        client_latency_s=args.client_latency_s, keep_token_times=not args.no_token_times, seed=args.seed)


def run(args: argparse.Namespace) -> dict:
    from kunserve.sim import simulate
    from kunserve.sim.results import LABEL, write_report

    policies = args.policies if args.compare else [args.policy]
    base = config_for(args, policies[0])
    if args.max_model_len is None:
        args.max_model_len = base.shape.config.max_position_embeddings
    # one workload for every policy, sized from the no-drop KV capacity of the cluster
    capacity_tokens = args.instances * base.instance_blocks * args.block_size
    trace = build_workload(args, capacity_tokens)
    workload = {"requests": len(trace), "duration_s": trace.duration_s, "mean_rate": trace.mean_rate,
                "capacity_tokens": capacity_tokens, "trace": args.trace,
                "synthetic": None if args.trace else args.synthetic}
    print(f"{LABEL}\nworkload: {len(trace)} requests over {trace.duration_s:.1f} s; cluster KV capacity "
          f"{capacity_tokens} tokens ({args.instances} x {base.instance_blocks} blocks of {args.block_size})")
    runs = {}
    for policy in policies:
        runs[policy] = simulate(config_for(args, policy), trace)
        r = runs[policy]
        print(f"  {policy}: simulated {r.end_time:.1f} s in {r.wall_s:.1f} s wall "
              f"({r.steps_exact} exact + {r.steps_ff} fast-forwarded steps), unfinished {r.unfinished}")
    report = write_report(Path(args.out), runs, workload, args.plots)
    print(report["table"])
    print(f"wrote {Path(args.out) / 'summary.json'}" + ("".join(f", {f}" for f in report["figures"])))
    return report


def main(argv=None) -> int:
    # the controller warns at every simulated overload it cannot cover; the summary counts them
    logger = logging.getLogger("kunserve.runtime.drop_controller")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return _main(argv)
    finally:
        logger.setLevel(level)


def _main(argv) -> int:
    report = run(parse_args(argv))
    unfinished = sum(s["unfinished"] for s in report["summary"].values())
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
