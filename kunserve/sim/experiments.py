"""Paper-style experiments and the simulator's speed benchmark (all results are simulation).

    python -m kunserve.sim.experiments paper --instances 8 64 --out out/sim-paper
    python -m kunserve.sim.experiments speed --instances 64 --upscale 1 8

``paper``: the KunServe paper's comparison (Qwen-2.5-14B shape, one 80 GB GPU per instance,
200 Gbps RDMA between instances): P99 TTFT of kunserve vs vllm, vllm-pp, swap (InferCept-style)
and llumnix; SLO violation at SLO scales 1-10; P50 TPOT. The paper replays BurstGPT arrivals
scaled so the mean memory demand stays under 60% of capacity. Here the arrivals are BurstGPT-like
on/off bursts (``bench.traces.onoff_arrivals``): a steady ``base_rate`` per instance plus, every
``period_s``, a burst of ``burst_requests`` per instance within ``on_s`` seconds; the lengths are
uniform around BurstGPT's mean lengths as the paper reports them (642 in / 262 out, +-50%), or
(``--lengths azure-conv``) drawn from the Azure conversation trace shipped with the bench. The
per-instance load is the same at every cluster size.

``speed``: 64 instances x one hour of the Azure conversation trace (its own arrival times, at
its own rate or replicated ``--upscale`` times), wall time of the simulation on one core.

``bubble``: issue 7's ablation, the pipeline bubble of the token-budget vs the lookahead
micro-batcher under a burst, with the lockstep flow shop (``pipeline_overlap=False``: the
pipeline drains at the end of every step), with the runtime's request sets (``pipeline_model=
"sets"``: one set's step after another, stages carrying over from step to step) and with the
analytic overlapped model (a step costs its bottleneck stage, so only a micro-batch holding more
than a stage's share of the step leaves a bubble).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import attrs

from kunserve.bench import traces
from kunserve.sim.config import PIPELINE_MODELS, POLICIES, SimConfig

CONV = "AzureLLMInferenceTrace_conv.csv"


@attrs.frozen(kw_only=True)
class BurstWorkload:
    """On/off bursts per instance, with synthetic or Azure-conversation lengths (validated once)."""

    base_rate: float = 6.0  # requests/s per instance between bursts
    burst_requests: float = 300.0  # extra requests per instance in each burst
    on_s: float = 10.0
    period_s: float = 60.0
    duration_s: float = 300.0
    max_model_len: int = 32768
    seed: int = 0
    # None: lengths drawn from the Azure conversation trace; else uniform in len x [0.5, 1.5]
    # (default: BurstGPT's mean lengths as the paper reports them, 642 in / 262 out)
    input_len: int | None = 642
    output_len: int | None = 262

    def __attrs_post_init__(self) -> None:
        for name in ("base_rate", "burst_requests", "on_s", "period_s", "duration_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.on_s >= self.period_s:
            raise ValueError(f"on_s ({self.on_s}) must be shorter than period_s ({self.period_s})")

    def build(self, instances: int) -> traces.Trace:
        base = self.base_rate * instances
        burst = base + self.burst_requests * instances / self.on_s
        expected = base * self.duration_s + self.burst_requests * instances * (self.duration_s / self.period_s + 1)
        arrivals = traces.onoff_arrivals(int(expected * 1.2) + 10, base, burst, self.period_s - self.on_s, self.on_s,
                                         seed=self.seed)
        arrivals = [a for a in arrivals if a < self.duration_s]
        if self.input_len is not None and self.output_len is not None:
            trace = traces.synthetic_trace(arrivals, self.input_len, self.output_len, 0.5, self.seed)
            return attrs.evolve(traces.clip_lengths(trace, self.max_model_len), duration_s=self.duration_s)
        conv = traces.clip_lengths(traces.load_trace(CONV), self.max_model_len)
        rng = random.Random(self.seed + 7)
        picks = [rng.randrange(len(conv)) for _ in arrivals]
        return traces.Trace(tuple(arrivals), tuple(conv.prompt_lens[i] for i in picks),
                            tuple(conv.output_lens[i] for i in picks), self.duration_s)


_DEFAULT = BurstWorkload()


def paper_config(policy: str, instances: int, **overrides) -> SimConfig:
    """The paper's 14B setting: Qwen-2.5-14B on H100-80GB, 200 Gbps RDMA, block size 64; up to
    1024 running requests per instance (vLLM v1's default on large GPUs; with 256 the sequence
    cap, not memory, holds bursts back); 64 GiB of host swap space per instance for the swap
    baseline (vLLM's 4 GiB default holds a tenth of the KV cache; InferCept sizes it for the
    paused requests)."""
    settings = dict(policy=policy, instances=instances, model="qwen2.5-14b", gpu="h100-80gb", link="rdma-200",
                    block_size=64, max_num_seqs=1024, swap_space_bytes=64 << 30, keep_token_times=False)
    return SimConfig(**{**settings, **overrides})


def run_paper(instances: int, workload: BurstWorkload, out: Path, policies=POLICIES, plots: bool = True,
              **overrides) -> dict:
    from kunserve.sim import simulate
    from kunserve.sim.results import write_report

    trace = workload.build(instances)
    runs = {}
    for policy in policies:
        runs[policy] = simulate(paper_config(policy, instances, **overrides), trace)
        print(f"  {instances} instances, {policy}: {len(trace)} requests, simulated {runs[policy].end_time:.0f} s "
              f"in {runs[policy].wall_s:.1f} s wall")
    base = paper_config(policies[0], instances, **overrides)
    desc = {**attrs.asdict(workload), "requests": len(trace), "mean_rate": len(trace) / workload.duration_s,
            "capacity_tokens": instances * base.instance_blocks * base.block_size,
            "mean_demand_fraction_at_25_tok_s": traces.mean_demand_tokens(trace, 25.0)
            / (instances * base.instance_blocks * base.block_size)}
    report = write_report(out, runs, desc, plots)
    print(report["table"])
    return report


def headline(report: dict) -> dict:
    """P99 TTFT, P50 TPOT and SLO violation (scales 1, 5, 10) per policy, and the ratios."""
    summary, slo = report["summary"], report["slo"]
    rows = {}
    for policy, s in summary.items():
        viol = {r["scale"]: r["violation_rate"] for r in slo["policies"][policy]}
        rows[policy] = {"ttft_p99_s": s["ttft_s"]["p99"], "ttft_p50_s": s["ttft_s"]["median"],
                        "tpot_p50_s": s["tpot_s"]["median"], "slo_violation": viol,
                        "preemptions": s["preemptions"], "drops": s["drops"], "restores": s["restores"],
                        "wall_s": s["sim"]["wall_s"]}
    if "kunserve" in rows:
        k = rows["kunserve"]
        for policy, r in rows.items():
            r["ttft_p99_over_kunserve"] = r["ttft_p99_s"] / k["ttft_p99_s"]
            r["tpot_p50_kunserve_cost"] = k["tpot_p50_s"] / r["tpot_p50_s"] - 1
    return rows


def plot_paper(run_dirs: list[Path], path: Path) -> Path:
    """One figure of the paper-style comparison from saved ``summary.json`` files: P99 TTFT
    (log scale) and P50 TPOT per policy for each run, and SLO violation vs SLO scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [(f"{d.parent.name} {d.name}", json.loads((d / "summary.json").read_text())) for d in run_dirs]
    fig, axes = plt.subplots(1, 2 + len(reports), figsize=(5 * (2 + len(reports)), 4))
    policies = list(reports[0][1]["summary"])
    width = 0.8 / len(reports)
    for i, (name, report) in enumerate(reports):
        xs = [p + (i - (len(reports) - 1) / 2) * width for p in range(len(policies))]
        summary = report["summary"]
        axes[0].bar(xs, [summary[p]["ttft_s"]["p99"] for p in policies], width, label=name)
        axes[1].bar(xs, [summary[p]["tpot_s"]["median"] * 1e3 for p in policies], width, label=name)
        ax = axes[2 + i]
        for policy, rows in report["slo"]["policies"].items():
            ax.plot([r["scale"] for r in rows], [r["violation_rate"] * 100 for r in rows], marker="o", label=policy)
        ax.set_title(f"SLO violation, {name} (simulated)")
        ax.set_xlabel("SLO scale (x best P50 TTFT and TPOT)")
        ax.set_ylabel("violation rate (%)")
        ax.legend(fontsize=8)
    for ax, title in ((axes[0], "P99 TTFT (s, log)"), (axes[1], "P50 TPOT (ms)")):
        ax.set_xticks(range(len(policies)), policies)
        ax.set_title(f"{title} (simulated)")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylim(bottom=0.5)
    fig.suptitle("SIMULATION (kunserve.sim): Qwen-2.5-14B shape, H100-80GB, 200 Gbps RDMA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed(instances: int, upscale: float, policy: str, exact: bool = False) -> dict:
    """Simulate one hour of the Azure conversation trace on ``instances`` Qwen-14B instances."""
    from kunserve.sim import simulate
    from kunserve.sim.records import metrics_of

    trace = traces.clip_lengths(traces.load_trace(CONV), 32768)
    if upscale != 1:
        trace = traces.upscale(trace, upscale, "replicate", seed=0)
    config = paper_config(policy, instances, fast_forward=not exact, block_size=16)
    started = time.perf_counter()
    run = simulate(config, trace)
    wall = time.perf_counter() - started
    m = metrics_of(run.logs.values(), run.end_time)
    return {"instances": instances, "upscale": upscale, "policy": policy, "requests": len(trace),
            "simulated_s": run.end_time, "wall_s": wall, "steps_exact": run.steps_exact,
            "steps_fast_forwarded": run.steps_ff, "ttft_p99_s": m["ttft_s"]["p99"], "tpot_p50_s": m["tpot_s"]["median"],
            "unfinished": run.unfinished}


BUBBLE_BATCHERS = ("token-budget", "lookahead")
# (pipeline_overlap, pipeline_model): the lockstep flow shop, the runtime's request sets, analytic
BUBBLE_MODELS = ((False, "sets"), (True, "sets"), (True, "analytic"))


def _prefill_tally_sim(config: SimConfig, trace):
    """A ``ClusterSim`` whose units also count the member-seconds of their *prefill steps*
    (steps with a chunk of more than one token): with the lockstep flow shop a decode-only step
    below the batchers' split sizes is one micro-batch with a ~50% bubble whichever batcher runs,
    so the batchers differ in these steps (what the paper's ablation measures under a burst).
    With request sets a step's stages are spread over several engine iterations, so an
    iteration counts as a prefill step's when the step it launches or one it collects is one:
    the bubble while prefill work is in the pipeline."""
    from kunserve.sim.cluster import ClusterSim
    from kunserve.sim.instance import Unit
    from kunserve.sim.request_sets import RequestSetsUnit

    # subclasses rather than a counter in Unit: only this ablation splits the bubble by step kind

    class Tally:
        prefill_busy_s = prefill_bubble_s = 0.0

        def _charge(self, busy, bubble, outputs):
            super()._charge(busy, bubble, outputs)
            if any(c.num_tokens > 1 for output in outputs for c in output.chunks):  # stretches: decode-only
                self.prefill_busy_s += busy
                self.prefill_bubble_s += bubble

    class TallyUnit(Tally, Unit):
        pass

    class TallySetsUnit(Tally, RequestSetsUnit):
        pass

    class TallySim(ClusterSim):
        unit_class, sets_unit_class = TallyUnit, TallySetsUnit

    return TallySim(config, trace)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def bubble_ablation(workload: BurstWorkload, policy: str = "vllm-pp", instances: int = 2,
                    **overrides) -> list[dict]:
    """Per batcher (token-budget, lookahead) and pipeline model (``BUBBLE_MODELS``: lockstep,
    request sets, analytic) on one trace: the run's ``bubble_fraction``, the bubble of its
    pipelined units only (kunserve's unmerged instances have none), of their prefill steps only,
    TTFT P50 / P99, TPOT P50 and the simulation's wall time.
    ``overrides``: more ``SimConfig`` fields."""
    from kunserve.sim.results import summarize

    trace = workload.build(instances)
    rows = []
    for overlap, model in BUBBLE_MODELS:
        for batcher in BUBBLE_BATCHERS:
            config = SimConfig(policy=policy, instances=instances, micro_batching=batcher, pipeline_overlap=overlap,
                               pipeline_model=model, **overrides)
            sim = _prefill_tally_sim(config, trace)
            run = sim.run()
            s = summarize(run)
            piped = [u for u in (*sim.units.values(), *sim.retired) if u.timing.stages > 1]  # [pipelined units]
            prefill_busy = sum(u.prefill_busy_s for u in piped)
            prefill_bubble = sum(u.prefill_bubble_s for u in piped)
            rows.append({
                "policy": policy, "pipeline_overlap": overlap, "pipeline_model": model if overlap else "lockstep",
                "micro_batching": batcher,
                "min_tokens": config.batch_model[1] if batcher == "lookahead" else None,
                "micro_batch_tokens": config.micro_batch_tokens or config.max_num_batched_tokens // 2,
                "bubble_fraction": s["bubble_fraction"],
                "pipeline_bubble_fraction": _ratio(sum(u.bubble_s for u in piped), sum(u.stage_s for u in piped)),
                "prefill_bubble_fraction": _ratio(prefill_bubble, prefill_busy + prefill_bubble),
                "prefill_stage_share": _ratio(prefill_busy + prefill_bubble, sum(u.stage_s for u in piped)),
                "ttft_p50_s": s["ttft_s"]["median"], "ttft_p99_s": s["ttft_s"]["p99"],
                "tpot_p50_s": s["tpot_s"]["median"], "requests": len(trace), "drops": s["drops"],
                "preemptions": s["preemptions"], "unfinished": s["unfinished"], "wall_s": s["sim"]["wall_s"]})
    return rows


def format_bubble_rows(rows: list[dict]) -> str:
    """A markdown table of ``bubble_ablation``'s rows."""
    lines = ["| pipeline model | micro-batching | bubble (run) | bubble (pipelines) | bubble (prefill steps) | "
             "prefill steps' share | TTFT p50 | TTFT p99 | TPOT p50 | sim wall |", "|---" * 10 + "|"]
    for r in rows:
        model = {"lockstep": "lockstep flow shop", "sets": "overlapped (request sets)",
                 "analytic": "overlapped (analytic)"}[r["pipeline_model"]]
        batcher = (f"lookahead (MIN {r['min_tokens']})" if r["micro_batching"] == "lookahead"
                   else f"token-budget ({r['micro_batch_tokens']})")
        lines.append(f"| {model} | {batcher} | {r['bubble_fraction']:.1%} | {r['pipeline_bubble_fraction']:.1%} | "
                     f"{r['prefill_bubble_fraction']:.1%} | {r['prefill_stage_share']:.0%} | "
                     f"{r['ttft_p50_s'] * 1e3:,.0f} ms | {r['ttft_p99_s'] * 1e3:,.0f} ms | "
                     f"{r['tpot_p50_s'] * 1e3:.1f} ms | {r['wall_s']:.1f} s |")
    return "SIMULATION (kunserve.sim)\n" + "\n".join(lines)


def main(argv=None) -> int:
    # the controller warns at every simulated overload it cannot cover; the summary counts them
    loggers = [logging.getLogger(f"kunserve.runtime.{m}") for m in ("drop_controller", "scheduler")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return _main(argv)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m kunserve.sim.experiments", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    paper = sub.add_parser("paper")
    paper.add_argument("--instances", type=int, nargs="+", default=[8, 64])
    paper.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    paper.add_argument("--duration-s", type=float, default=300.0)
    paper.add_argument("--base-rate", type=float, default=_DEFAULT.base_rate)
    paper.add_argument("--burst-requests", type=float, default=_DEFAULT.burst_requests)
    paper.add_argument("--on-s", type=float, default=_DEFAULT.on_s)
    paper.add_argument("--period-s", type=float, default=_DEFAULT.period_s)
    paper.add_argument("--seed", type=int, default=0)
    paper.add_argument("--lengths", choices=("burstgpt-mean", "azure-conv"), default="burstgpt-mean",
                       help="burstgpt-mean: uniform around 642 in / 262 out (the paper's BurstGPT means); "
                            "azure-conv: drawn from the Azure conversation trace")
    paper.add_argument("--pipeline-model", default="sets", choices=PIPELINE_MODELS,
                       help="overlapped pipelines (vllm-pp, kunserve groups): the runtime's request sets, "
                            "or the analytic steady state (faster: its decode stretches fast-forward)")
    paper.add_argument("--out", default="out/sim-paper")
    paper.add_argument("--no-plots", action="store_true")
    fig = sub.add_parser("figure", help="draw the paper-style figure from saved runs")
    fig.add_argument("runs", nargs="+", help="directories holding summary.json (e.g. out/sim-paper/.../8-instances)")
    fig.add_argument("--out", default="out/sim-paper/paper.png")
    sp = sub.add_parser("speed")
    sp.add_argument("--instances", type=int, default=64)
    sp.add_argument("--upscale", type=float, nargs="+", default=[1.0])
    sp.add_argument("--policy", default="vllm", choices=POLICIES)
    sp.add_argument("--exact", action="store_true")
    sp.add_argument("--out", default=None)
    bub = sub.add_parser("bubble", help="pipeline bubble: token-budget vs lookahead; lockstep, request sets, analytic")
    bub.add_argument("--policy", default="vllm-pp", choices=("vllm-pp", "kunserve"))
    bub.add_argument("--instances", type=int, default=2)
    bub.add_argument("--model", default="qwen2.5-14b")
    bub.add_argument("--profile", default=None, help="fitted cost model JSON; default: the roofline")
    bub.add_argument("--num-kv-blocks", type=int, default=None)
    bub.add_argument("--max-num-batched-tokens", type=int, default=8192)
    bub.add_argument("--micro-batch-tokens", type=int, default=None)
    bub.add_argument("--duration-s", type=float, default=60.0)
    bub.add_argument("--base-rate", type=float, default=0.1)
    bub.add_argument("--burst-requests", type=float, default=100.0)
    bub.add_argument("--on-s", type=float, default=2.0)
    bub.add_argument("--period-s", type=float, default=30.0)
    bub.add_argument("--input-len", type=int, default=2048)
    bub.add_argument("--output-len", type=int, default=64)
    bub.add_argument("--no-pipeline-scales-limits", action="store_true",
                     help="a pipeline schedules one instance's budgets (the runtime as built), not g x")
    bub.add_argument("--seed", type=int, default=0)
    bub.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.command == "bubble":
        workload = BurstWorkload(base_rate=args.base_rate, burst_requests=args.burst_requests, on_s=args.on_s,
                                 period_s=args.period_s, duration_s=args.duration_s, seed=args.seed,
                                 input_len=args.input_len, output_len=args.output_len)
        rows = bubble_ablation(workload, args.policy, args.instances, model=args.model, profile=args.profile,
                               num_kv_blocks=args.num_kv_blocks, max_num_batched_tokens=args.max_num_batched_tokens,
                               micro_batch_tokens=args.micro_batch_tokens, seed=args.seed,
                               pipeline_scales_limits=not args.no_pipeline_scales_limits)
        print(format_bubble_rows(rows))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.command == "paper":
        workload = BurstWorkload(base_rate=args.base_rate, burst_requests=args.burst_requests, on_s=args.on_s,
                                 period_s=args.period_s, duration_s=args.duration_s, seed=args.seed,
                                 **({} if args.lengths == "burstgpt-mean" else {"input_len": None, "output_len": None}))
        results = {}
        for n in args.instances:
            report = run_paper(n, workload, Path(args.out) / f"{n}-instances", args.policies, not args.no_plots,
                               pipeline_model=args.pipeline_model)
            results[n] = headline(report)
            print(json.dumps(results[n], indent=1))
        (Path(args.out) / "headline.json").write_text(json.dumps(results, indent=1) + "\n")
        return 0
    if args.command == "figure":
        print(plot_paper([Path(d) for d in args.runs], Path(args.out)))
        return 0
    results = [speed(args.instances, u, args.policy, args.exact) for u in args.upscale]
    for r in results:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
