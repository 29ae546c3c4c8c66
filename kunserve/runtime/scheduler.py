"""Continuous batching with chunked prefill and recompute preemption (vLLM v1 semantics).

Each step the scheduler spends a token budget: first on running requests in admission order
(a long prefill is chunked to what the budget allows), then, only if nothing was preempted in
this step, on waiting requests in FCFS order. When a running request needs a KV block and none
is free, the newest running request is preempted: its blocks are freed, its computed-token count
is reset to 0 and it goes to the head of the waiting queue, to be recomputed later.
"""

from __future__ import annotations

import time
from collections import deque

import attrs

from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request, RequestStatus


@attrs.frozen
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at ``request.num_computed_tokens``."""

    request: Request
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the request's last token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@attrs.frozen
class SchedulerOutput:
    """The plan of one step: consumed by the model runner (chunks) and by metrics (preempted)."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Invariants: a request is in exactly one of ``waiting`` / ``running`` or finished;
    every running request holds blocks for all its computed tokens; ``running`` is in
    admission order, so its tail is the newest request (the preemption victim)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Running requests whose KV is still moving between pipeline members after a merge: they
        # hold blocks but are neither scheduled nor preemption victims until ``resume``.
        self.stalled: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.stalled)

    def stall(self, request: Request) -> None:
        """Park a request that holds KV blocks (its KV is in transit); it keeps its blocks."""
        request.status = RequestStatus.RUNNING
        self.stalled[request.request_id] = request

    def resume(self, request_id: str) -> Request | None:
        """A stalled request's KV has arrived: it runs again from the next schedule on. Returns
        None if it finished (was aborted) meanwhile; the caller then frees its blocks."""
        request = self.stalled.pop(request_id, None)
        if request is not None:
            self.running.append(request)
        return request

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self._make_room(request, num_tokens, preempted):
                break  # the request itself was preempted; it was the newest
            chunks.append(self._admit_chunk(request, num_tokens))
            budget -= num_tokens
            index += 1
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _make_room(self, request: Request, num_tokens: int, preempted: list[str]) -> bool:
        """Preempt newest requests until ``request`` can grow; False if it was preempted."""
        target = request.num_computed_tokens + num_tokens
        while not self.block_manager.can_allocate(request.request_id, target):
            victim = self.running.pop()
            self.preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(request.request_id, num_tokens):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(self._admit_chunk(request, num_tokens))
            budget -= num_tokens
        return budget

    def _admit_chunk(self, request: Request, num_tokens: int) -> ScheduledChunk:
        self.block_manager.allocate(request.request_id, request.num_computed_tokens + num_tokens)
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = time.time()
        return ScheduledChunk(request, num_tokens)

    def preempt_newest(self) -> bool:
        """Preempt the newest running request (recompute later); False if none is running."""
        if not self.running:
            return False
        self.preempt(self.running.pop())
        return True

    def preempt(self, request: Request) -> None:
        """``request`` (already removed from ``running``) goes back to the head of the queue."""
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens; returns requests that finished."""
        now = time.time()
        finished = []
        for chunk in output.chunks:
            request = chunk.request
            completes = chunk.completes
            request.num_computed_tokens += chunk.num_tokens
            if not completes:
                continue  # a partial prefill chunk: its sample is meaningless
            request.append_token(sampled[request.request_id], now)
            status = request.check_stop_token()
            if status is not None:
                self.finish(request, status)
                finished.append(request)
        return finished

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (running or waiting) for good and free its blocks."""
        assert status.finished
        if self.stalled.pop(request.request_id, None) is not None:
            # Its blocks stay until the exchange delivering its KV is done (the members still
            # receive into theirs); ``resume`` then reports it gone and the caller frees them.
            request.status = status
            request.metrics.finished_time = time.time()
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        request.metrics.finished_time = time.time()
        self.block_manager.free(request.request_id)
