"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time

import torch

from kunserve.outputs import RequestMetrics
from kunserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """One generation request.

    Invariants: ``token_ids`` = prompt followed by generated tokens;
    ``0 <= num_computed_tokens <= len(token_ids)`` counts tokens whose K/V are in the cache;
    ``num_computed_tokens + num_in_flight_tokens <= len(token_ids)``: in-flight tokens are in
    chunks of steps launched but not yet applied (an overlapped pipeline), so the next chunk
    starts after them; ``len(token_ids) <= max_total_tokens``. Recompute preemption resets both
    counts to 0, after which prompt and outputs are prefilled again.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_total_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
        prompt: str | None = None,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.prompt_token_ids = list(prompt_token_ids)  # kept apart: outputs share it every step
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_total_tokens = max_total_tokens
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.num_computed_tokens = 0
        self.num_in_flight_tokens = 0
        self.status = RequestStatus.WAITING
        # Which of an overlapped pipeline's request sets steps it (runtime/pipeline.py); 0 elsewhere.
        self.virtual_engine = 0
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens computed or in a step in flight: where the next chunk starts."""
        return self.num_computed_tokens + self.num_in_flight_tokens

    @property
    def num_unscheduled_tokens(self) -> int:
        """Tokens no step has been given yet: 0 while the chunk that samples the next token is
        in flight (that token is not known before its result is applied)."""
        return len(self.token_ids) - self.num_scheduled_tokens

    def append_token(self, token_id: int, now: float) -> None:
        self.token_ids.append(token_id)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.token_times.append(now)

    def check_stop_token(self) -> RequestStatus | None:
        """Finish status implied by the last token and the length limits, if any."""
        last = self.token_ids[-1]
        if last in self.eos_token_ids or last in self.params.stop_token_ids:
            self.stop_reason = None if last in self.eos_token_ids else last
            return RequestStatus.FINISHED_STOPPED
        max_tokens = self.params.max_tokens
        if (max_tokens is not None and self.num_output_tokens >= max_tokens) or (
            self.num_tokens >= self.max_total_tokens
        ):
            return RequestStatus.FINISHED_LENGTH
        return None
