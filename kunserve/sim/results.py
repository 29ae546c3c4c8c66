"""A simulation's summary, tables and figures, through the bench's own code.

Metrics: ``kunserve/bench/_metrics.py`` (vLLM definitions); SLO sweep and the comparison table:
``kunserve/bench/compare.py`` (``slo_sweep``, ``format_table``); figures:
``kunserve/bench/plots.py``. Everything is labelled as simulation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs

from kunserve.sim.cluster import SimRun
from kunserve.sim.records import metrics_of

LABEL = "SIMULATION (kunserve.sim): step times from a cost model, not measured on hardware"


def _plain(value):
    """JSON-safe copies of numpy scalars inside nested data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def duration_of(run: SimRun) -> float:
    """The benchmark window: first arrival (0) to the last token."""
    return max(run.end_time, 1e-9)


def summarize(run: SimRun) -> dict:
    """Serving metrics plus the policy's and the simulator's counters (JSON-safe)."""
    cfg = run.config
    metrics = metrics_of(run.logs.values(), duration_of(run), cfg.client_latency_s)
    regroups = run.regroups.metrics() if run.regroups else {}
    migrations = run.migrations.metrics() if run.migrations else {}
    summary = {
        **metrics,
        "drops": regroups.get("drops", 0), "restores": regroups.get("restores", 0),
        "preemptions": run.preemptions, "unfinished": run.unfinished,
        "swapped_bytes": run.swapped_bytes, "swapped_out_bytes": run.swapped_out_bytes,
        "migrations": migrations.get("migrations_completed", 0),
        "bubble_fraction": run.bubble_s / run.stage_s if run.stage_s else 0.0,
        "policy": {**regroups, **migrations},
        "sim": {"wall_s": run.wall_s, "steps_exact": run.steps_exact, "steps_fast_forwarded": run.steps_ff,
                "stretches": run.stretches, "simulated_s": run.end_time},
    }
    return _plain(summary)


def config_dict(run: SimRun) -> dict:
    cfg = run.config
    out = {f.name: getattr(cfg, f.name) for f in attrs.fields(type(cfg))}
    out["instance_kv_blocks"] = cfg.instance_blocks
    out["weights_gb"] = cfg.shape.weight_bytes / 1e9
    return _plain(out)


def bench_result(run: SimRun) -> dict:
    """The shape ``kunserve.bench.plots`` draws (``compare.run_policy``'s result)."""
    return {"records": [log.record(run.config.client_latency_s) for log in run.logs.values()],
            "samples": run.samples, "t0": 0.0, "duration_s": duration_of(run)}


def write_report(out: Path, runs: dict[str, SimRun], workload: dict, plots: bool) -> dict:
    """``summary.json`` (+ ``table.txt`` and PNGs when comparing) in ``out``; returns the report."""
    from kunserve.bench.compare import format_table, p99_ttft_ratio, slo_sweep

    out.mkdir(parents=True, exist_ok=True)
    summaries = {p: summarize(r) for p, r in runs.items()}
    results = {p: bench_result(r) for p, r in runs.items()}
    sweep = slo_sweep({p: r["records"] for p, r in results.items()}, {p: r["duration_s"] for p, r in results.items()})
    table = LABEL + "\n" + format_table(summaries, sweep)
    ratios = {b: p99_ttft_ratio(summaries, b) for b in summaries if b != "kunserve"} if "kunserve" in summaries else {}
    report = {"simulation": True, "label": LABEL, "workload": workload,
              "config": {p: config_dict(r) for p, r in runs.items()}, "summary": summaries, "slo": _plain(sweep),
              "p99_ttft_ratio_baseline_over_kunserve": ratios}
    figures = []
    if plots:
        from kunserve.bench import plots as bench_plots

        labelled = {f"{p} (simulated)": r for p, r in results.items()}
        labelled_sweep = {**sweep, "policies": {f"{p} (simulated)": rows for p, rows in sweep["policies"].items()}}
        window = max(0.5, duration_of(next(iter(runs.values()))) / 60)
        figures = [str(f) for f in bench_plots.write_all(out, labelled, labelled_sweep, window)]
    report["figures"] = figures
    (out / "summary.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "table.txt").write_text(table + "\n")
    report["table"] = table
    return report
