"""Figures for ``kunserve.bench compare`` (matplotlib, Agg backend, PNG).

Plotting only: every function takes plain data (per-policy results as ``compare.run_policy``
returns them: ``records``, ``samples``, ``t0``, ``duration_s``; the SLO sweep dict) and writes a
file, so figures can be redrawn from saved results without running a cluster.

- ``timeline.png``: one column per policy; request rate per window, KV demand vs capacity with
  drops / restores marked, mean TTFT per window (like the KunServe paper's Figures 12 and 16).
- ``latency_cdf.png``: TTFT and TPOT CDFs per policy.
- ``slo.png``: SLO violation rate and goodput vs SLO scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from kunserve.bench.traces import rate_per_window  # noqa: E402

COLORS = {"vllm": "tab:blue", "kunserve": "tab:red"}


def _color(policy: str, i: int) -> str:
    return COLORS.get(policy, f"C{i + 2}")


def _windows(duration_s: float, window_s: float) -> list[float]:
    return [i * window_s for i in range(max(1, math.ceil(duration_s / window_s)))]


def rate_series(send_times: list[float], duration_s: float, window_s: float) -> tuple[list[float], list[float]]:
    return _windows(duration_s, window_s), rate_per_window(send_times, window_s, duration_s)


def mean_ttft_series(send_times: list[float], ttfts: list[float], duration_s: float,
                     window_s: float) -> tuple[list[float], list[float]]:
    """Mean TTFT of the requests sent in each window (NaN where none was sent)."""
    starts = _windows(duration_s, window_s)
    sums, counts = [0.0] * len(starts), [0] * len(starts)
    for t, v in zip(send_times, ttfts):
        i = min(max(int(t // window_s), 0), len(starts) - 1)
        sums[i] += v
        counts[i] += 1
    return starts, [s / c if c else math.nan for s, c in zip(sums, counts)]


def kv_series(samples: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """Cluster-wide KV demand and capacity (blocks) per sample."""
    ts = [s["t"] for s in samples]
    demand = [sum(v.get("memory_demand_blocks", 0.0) for v in s["instances"].values()) for s in samples]
    capacity = [sum(v.get("kv_cache_total_blocks", 0.0) for v in s["instances"].values()) for s in samples]
    return ts, demand, capacity


def _events(samples: list[dict], key: str) -> list[float]:
    out, last = [], 0.0
    for s in samples:
        if s[key] > last:
            out.append(s["t"])
        last = max(last, s[key])
    return out


def _request_data(result: dict) -> tuple[list[float], list[float], list[float]]:
    done = [r for r in result["records"] if r.ok and r.token_times]
    sends = [r.send_time - result["t0"] for r in done]
    return sends, [r.ttft for r in done], [t for t in (r.tpot for r in done) if t is not None]


def _span(result: dict) -> float:
    last_sample = result["samples"][-1]["t"] if result["samples"] else 0.0
    return max(result["duration_s"], last_sample)


def plot_timeline(results: dict[str, dict], path: Path, window_s: float = 0.5) -> Path:
    policies = list(results)
    fig, axes = plt.subplots(3, len(policies), figsize=(4.8 * len(policies), 7.5), sharex="col", squeeze=False)
    span = max(_span(r) for r in results.values())
    ttft_max = 0.0
    for col, policy in enumerate(policies):
        result = results[policy]
        sends, ttfts, _ = _request_data(result)
        rate_ax, kv_ax, ttft_ax = axes[0][col], axes[1][col], axes[2][col]
        xs, rates = rate_series(sends, span, window_s)
        rate_ax.bar(xs, rates, width=window_s, align="edge", color="0.55")
        rate_ax.set_title(policy)
        ts, demand, capacity = kv_series(result["samples"])
        kv_ax.plot(ts, demand, color=_color(policy, col), label="KV demand")
        kv_ax.step(ts, capacity, where="post", color="black", linestyle="--", label="KV capacity")
        for i, t in enumerate(_events(result["samples"], "drops_total")):
            kv_ax.axvline(t, color="tab:orange", linewidth=1.5, label="drop" if i == 0 else None)
        for i, t in enumerate(_events(result["samples"], "restores_total")):
            kv_ax.axvline(t, color="tab:green", linewidth=1.5, linestyle=":", label="restore" if i == 0 else None)
        kv_ax.legend(fontsize=7, loc="upper right")
        xs, means = mean_ttft_series(sends, ttfts, span, window_s)
        ttft_ax.bar(xs, [m * 1e3 if not math.isnan(m) else 0.0 for m in means], width=window_s, align="edge",
                    color=_color(policy, col))
        ttft_max = max([ttft_max] + [m * 1e3 for m in means if not math.isnan(m)])
        ttft_ax.set_xlabel("time since load start (s)")
    for col in range(len(policies)):
        axes[2][col].set_ylim(0, ttft_max * 1.1 or 1)  # same scale across policies: compare by eye
    axes[0][0].set_ylabel(f"requests/s ({window_s:g} s windows)")
    axes[1][0].set_ylabel("KV blocks (cluster)")
    axes[2][0].set_ylabel("mean TTFT (ms) by send time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def plot_latency_cdfs(results: dict[str, dict], path: Path) -> Path:
    fig, (ttft_ax, tpot_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (policy, result) in enumerate(results.items()):
        _, ttfts, tpots = _request_data(result)
        for ax, values in ((ttft_ax, ttfts), (tpot_ax, tpots)):
            if values:
                xs, ys = _cdf([v * 1e3 for v in values])
                ax.step(xs, ys, where="post", color=_color(policy, i), label=policy)
    for ax, name in ((ttft_ax, "TTFT (ms)"), (tpot_ax, "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
    return _save(fig, (ttft_ax, tpot_ax), path)


def _save(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_slo(sweep: dict, path: Path) -> Path:
    fig, (viol_ax, good_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (policy, rows) in enumerate(sweep["policies"].items()):
        scales = [r["scale"] for r in rows]
        viol_ax.plot(scales, [r["violation_rate"] * 100 for r in rows], marker="o", color=_color(policy, i), label=policy)
        good_ax.plot(scales, [r["goodput"] for r in rows], marker="o", color=_color(policy, i), label=policy)
    viol_ax.set_ylabel("SLO violation rate (%)")
    good_ax.set_ylabel("goodput (req/s)")
    for ax in (viol_ax, good_ax):
        ax.set_xlabel("SLO scale (x best P50 TTFT and TPOT)")
    return _save(fig, (viol_ax, good_ax), path)


def write_all(out: Path, results: dict[str, dict], sweep: dict, window_s: float = 0.5) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_timeline(results, out / "timeline.png", window_s), plot_latency_cdfs(results, out / "latency_cdf.png"),
            plot_slo(sweep, out / "slo.png")]
