"""Serving metrics with vLLM's benchmark names and definitions.

Per request (all times in seconds, from the client's clock):
- TTFT: first token time - send time.
- TPOT: (E2EL - TTFT) / (output tokens - 1), the mean time per output token after the first;
  undefined (skipped) for single-token outputs.
- ITL: every gap between consecutive tokens (pooled over requests).
- E2EL: last token time - send time.
Aggregates: mean, median, p90, p99, p99.9 (linear interpolation, as numpy's default), request
and output-token throughput over the benchmark's duration, goodput (requests per second that
meet every given SLO) and the SLO violation rate.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs

PERCENTILES = (50, 90, 99, 99.9)


@attrs.frozen
class RequestRecord:
    """What the client saw of one request. ``token_times`` are absolute, one per output chunk
    that carried tokens; ``output_tokens`` counts tokens (from usage) — chunks may merge."""

    send_time: float
    token_times: tuple[float, ...]
    output_tokens: int
    prompt_tokens: int = 0
    ok: bool = True
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.send_time

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.send_time

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else math.nan}
    for q in PERCENTILES:
        out["median" if q == 50 else f"p{q:g}"] = percentile(values, q)
    return out


def serving_metrics(records: Sequence[RequestRecord], duration_s: float, slo_s: dict[str, float] | None = None) -> dict:
    """Aggregate metrics; ``slo_s`` maps "ttft" / "tpot" / "e2el" to a limit in seconds."""
    done = [r for r in records if r.ok and r.token_times]
    tpots = [t for t in (r.tpot for r in done) if t is not None]
    metrics = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_throughput": sum(r.output_tokens for r in done) / duration_s,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in done) / duration_s,
        "ttft_s": summarize([r.ttft for r in done]),
        "tpot_s": summarize(tpots),
        "itl_s": summarize([gap for r in done for gap in r.itls]),
        "e2el_s": summarize([r.e2el for r in done]),
    }
    if slo_s:
        good = [r for r in done if meets_slo(r, slo_s)]
        metrics["goodput"] = len(good) / duration_s
        metrics["slo_violation_rate"] = 1 - len(good) / len(records) if records else math.nan
    return metrics


def meets_slo(record: RequestRecord, slo_s: dict[str, float]) -> bool:
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2el": record.e2el}
    return all(values[k] is None or values[k] <= limit for k, limit in slo_s.items())
