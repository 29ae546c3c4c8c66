"""Results handed back to users, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

import attrs


@attrs.define
class RequestMetrics:
    """Wall-clock times (``time.time()`` seconds) of one request's life; benchmarks build on it.

    ``token_times[i]`` is when output token i was produced; ``first_token_time == token_times[0]``.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = attrs.field(factory=list)
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@attrs.define
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None


@attrs.define
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
