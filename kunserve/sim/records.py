"""Per-request timing as the simulator observes it, turned into the bench's ``RequestRecord``.

Metrics are the bench's (``kunserve/bench/_metrics.py``: vLLM's definitions), computed from
``RequestRecord``s with the simulated arrival as the send time. Keeping every token time costs
8 bytes per generated token; for long runs ``keep_token_times=False`` keeps the first and last
only, which gives TTFT, TPOT and E2EL exactly but not ITL (reported as not recorded).
"""

from __future__ import annotations

import math

from kunserve.bench._metrics import RequestRecord, serving_metrics


class RequestLog:
    """Invariants: ``count`` tokens were produced, the first at ``first`` and the last at
    ``last``; ``times`` (when kept) lists all of them in order."""

    __slots__ = ("arrival", "prompt_tokens", "max_tokens", "first", "last", "count", "times", "finished_at",
                 "finishes", "preemptions", "unit")

    def __init__(self, arrival: float, prompt_tokens: int, max_tokens: int, keep_times: bool):
        self.arrival, self.prompt_tokens, self.max_tokens = arrival, prompt_tokens, max_tokens
        self.first = self.last = self.finished_at = None
        self.count = self.preemptions = self.finishes = 0
        self.times = [] if keep_times else None
        self.unit = None  # the unit it finished on

    def add(self, t: float) -> None:
        if self.first is None:
            self.first = t
        self.last = t
        self.count += 1
        if self.times is not None:
            self.times.append(t)

    def add_list(self, ends: list, steps: int) -> None:
        """The first ``steps`` step end times of a fast-forwarded stretch."""
        if steps <= 0:
            return
        if self.first is None:
            self.first = ends[0]
        self.last = ends[steps - 1]
        self.count += steps
        if self.times is not None:
            self.times.extend(ends[:steps])

    def record(self, latency_s: float = 0.0) -> RequestRecord:
        """The bench record; ``latency_s`` is added to every token time (client delivery)."""
        if self.first is None:
            return RequestRecord(self.arrival, (), 0, self.prompt_tokens, False, "not finished")
        if self.times is not None:
            times = tuple(t + latency_s for t in self.times)
        else:
            times = (self.first + latency_s,) if self.count == 1 else (self.first + latency_s, self.last + latency_s)
        return RequestRecord(self.arrival, times, self.count, self.prompt_tokens, self.finished_at is not None)


def metrics_of(logs, duration_s: float, latency_s: float = 0.0, slo_s: dict | None = None) -> dict:
    """The bench's ``serving_metrics`` over ``logs``; ITL is NaN when token times were not kept."""
    logs = list(logs)
    metrics = serving_metrics([log.record(latency_s) for log in logs], duration_s, slo_s)
    if logs and logs[0].times is None:
        metrics["itl_s"] = {k: math.nan for k in metrics["itl_s"]}
        metrics["itl_note"] = "not recorded (keep_token_times=False)"
    return metrics
