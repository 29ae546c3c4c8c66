"""Workload arguments shared by ``bench serve`` and ``bench compare``: a replayed trace
(Azure format, windowed, lengths scaled and clipped, load upscaled or aimed at a target mean
memory demand) or synthetic arrivals (gamma with burstiness, or BurstGPT-like on/off bursts)."""

from __future__ import annotations

import argparse

from kunserve.bench import traces


def add_workload_args(p: argparse.ArgumentParser, **defaults) -> None:
    """Trace replay or synthetic arrivals; ``defaults`` override the ones below per command."""
    g = p.add_argument_group("workload")
    g.add_argument("--trace", help="Azure-format CSV (e.g. AzureLLMInferenceTrace_conv.csv, shipped in kunserve/data/traces)")
    g.add_argument("--trace-start-s", type=float, default=0.0)
    g.add_argument("--trace-duration-s", type=float, default=None)
    g.add_argument("--token-scale", type=float, default=1.0, help="multiply trace lengths before clipping")
    g.add_argument("--upscale", type=float, default=1.0, help="load multiplier (ignored with --target-demand)")
    g.add_argument("--upscale-mode", choices=("compress", "replicate"), default="compress")
    g.add_argument("--target-demand", type=float, default=None,
                   help="scale the trace so mean KV demand = this fraction of the cluster's KV capacity")
    g.add_argument("--decode-tps", type=float, default=25.0, help="per-request decode rate for demand estimates")
    g.add_argument("--max-requests", type=int, default=None)
    g.add_argument("--synthetic", choices=("gamma", "onoff"), default="onoff")
    g.add_argument("--num-prompts", type=int, default=80)
    g.add_argument("--input-len", type=int, default=24)
    g.add_argument("--output-len", type=int, default=16)
    g.add_argument("--len-jitter", type=float, default=0.0, help="lengths uniform in len*(1 +- jitter)")
    g.add_argument("--request-rate", type=float, default=4.0, help="gamma rate, or the on/off base rate")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--burst-rate", type=float, default=400.0)
    g.add_argument("--off-s", type=float, default=2.0)
    g.add_argument("--on-s", type=float, default=0.15)
    g.add_argument("--seed", type=int, default=0)
    if defaults:
        p.set_defaults(**defaults)


def build_workload(args, capacity_tokens: float | None) -> traces.Trace:
    """The trace (windowed, clipped, upscaled) or synthetic arrivals the arguments describe."""
    if args.trace:
        trace = traces.window(traces.load_trace(args.trace), args.trace_start_s, args.trace_duration_s)
        trace = traces.clip_lengths(trace, args.max_model_len, args.token_scale)
        if args.target_demand is not None:
            if capacity_tokens is None:
                raise ValueError("--target-demand needs the cluster's KV capacity (--kv-capacity-tokens)")
            trace, factor = traces.scale_to_demand(trace, capacity_tokens, args.target_demand, args.decode_tps,
                                                   args.upscale_mode, args.seed)
            print(f"upscale factor {factor:.3f} for mean demand {args.target_demand:.0%} of {capacity_tokens:.0f} tokens")
        elif args.upscale != 1.0:
            trace = traces.upscale(trace, args.upscale, args.upscale_mode, args.seed)
        if args.max_requests is not None:
            trace = traces.window(trace, 0.0, trace.arrivals[min(args.max_requests, len(trace)) - 1] + 1e-9)
        return trace
    if args.synthetic == "gamma":
        arrivals = traces.gamma_arrivals(args.num_prompts, args.request_rate, args.burstiness, args.seed)
    else:
        arrivals = traces.onoff_arrivals(args.num_prompts, args.request_rate, args.burst_rate, args.off_s,
                                         args.on_s, args.burstiness, args.seed)
    trace = traces.synthetic_trace(arrivals, args.input_len, args.output_len, args.len_jitter, args.seed)
    return traces.clip_lengths(trace, args.max_model_len)
