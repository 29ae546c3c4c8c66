"""Continuous batching with chunked prefill and recompute preemption (vLLM v1 semantics).

Each step the scheduler spends a token budget: first on running requests in admission order
(a long prefill is chunked to what the budget allows), then, only if nothing was preempted in
this step, on waiting requests in FCFS order. When a running request needs a KV block and none
is free, the newest running request is preempted: its blocks are freed, its computed-token count
is reset to 0 and it goes to the head of the waiting queue, to be recomputed later. Under a
swapping preemption policy (``kunserve.policy.preemption.SwapPreemption``) the victim's KV is
instead copied to a host swap space (``SchedulerOutput.swapped_out``); it keeps its computed
count and, when re-admitted, gets fresh blocks that its KV is copied back into (``swapped_in``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import attrs

from kunserve.policy.preemption import Preempt, RecomputePreemption
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request, RequestStatus
from kunserve.runtime.swap import HostBlockPool, SwapOp

log = logging.getLogger(__name__)


@attrs.frozen
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` from token ``start`` on: by default where its
    computed tokens end; later when earlier chunks of it are still in flight (the scheduler
    passes it)."""

    request: Request
    num_tokens: int
    # The request's preemption count when scheduled: a result arriving after the request was
    # preempted (an overlapped pipeline's step in flight) belongs to KV that is gone.
    epoch: int = 0
    start: int = attrs.field(default=attrs.Factory(lambda self: self.request.num_computed_tokens, takes_self=True))

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the request's last token, so a new token is sampled.
        (A request is never scheduled past a completing chunk in flight, so its length is the
        same when the chunk's result is applied.)"""
        return self.start + self.num_tokens == self.request.num_tokens


@attrs.frozen
class SchedulerOutput:
    """The plan of one step: consumed by the model runner (chunks) and by metrics (preempted)."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()
    # KV copies the engine runs before the forward (swap policy only; never both in one step)
    swapped_out: tuple[SwapOp, ...] = ()
    swapped_in: tuple[SwapOp, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Invariants: a request is in exactly one of ``waiting`` / ``running`` or finished;
    every running request holds blocks for all its computed and in-flight tokens; a request is
    scheduled again while chunks of it are in flight only if none of them completes it (the
    next token is not known before that chunk's result is applied); ``running`` is in
    admission order, so its tail is the newest request (the preemption victim). A request in
    ``swapped`` is waiting and its host blocks hold the KV of all its computed tokens."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption=None, host_pool: HostBlockPool | None = None):
        self.block_manager = block_manager
        self.preemption = preemption or RecomputePreemption()
        assert host_pool is not None or not self.preemption.swaps, "a swapping policy needs a host pool"
        self.host_pool = host_pool
        self.swapped: dict[str, tuple[int, ...]] = {}  # waiting request id -> host blocks of its KV
        self._swap_out: list[SwapOp] = []  # this step's copies (reset by schedule)
        self._swap_in: list[SwapOp] = []
        self.num_swap_preemptions = 0
        self.num_recompute_fallbacks = 0
        self.num_continued_prefill_chunks = 0
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

    def schedule(self, virtual_engine: int | None = None, num_virtual_engines: int = 1,
                 decode_cost: Callable[[int], float] | None = None) -> SchedulerOutput:
        """The next step's chunks. With ``virtual_engine`` set (an overlapped pipeline leader),
        only that request set's running requests are stepped or preempted (the other sets'
        steps are still in flight), the other sets' prompts still being prefilled get their next
        chunks if the budget and free blocks allow, and admitted requests join the set.
        ``decode_cost(context)``: what one more decode of that context adds to a step (the
        lookahead policy's fitted cost model); the sets are balanced by it, else by count."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        self._swap_out, self._swap_in = [], []
        if virtual_engine is not None:
            self._rebalance(virtual_engine, num_virtual_engines, decode_cost)
        for request in [r for r in self.running if virtual_engine is None or r.virtual_engine == virtual_engine]:
            if budget <= 0 or request.request_id in preempted:
                break  # out of tokens, or reached the newest requests, preempted for older ones
            num_tokens = min(request.num_unscheduled_tokens, budget)
            if num_tokens == 0:
                continue  # its prompt's last chunk went with another set's step; its token is not back
            if not self._make_room(request, num_tokens, preempted, virtual_engine):
                break  # the request itself was preempted; it was the newest
            chunks.append(self._admit_chunk(request, num_tokens))
            budget -= num_tokens
        out_of_blocks = False
        if virtual_engine is not None and not preempted:
            budget, out_of_blocks = self._continue_prefills(budget, chunks, virtual_engine)
        if not (preempted or out_of_blocks):
            budget = self._admit_waiting(budget, chunks, virtual_engine or 0)
        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(self._swap_out), tuple(self._swap_in))

    def _continue_prefills(self, budget: int, chunks: list[ScheduledChunk], virtual_engine: int
                           ) -> tuple[int, bool]:
        """Give the next chunks of other sets' prompts to this set's step, oldest first, without
        preempting anyone for them. Under a burst with scarce KV one long prompt is often the
        only prefill admitted; held to its own set's steps, it would alternate full steps with the
        other sets' decode-only ones, and those unequal steps idle the stages (a bubble of about
        a stage's share of the full step). Its chunks may ride in any set's step: every stage
        runs steps in launch order, so a chunk's prefix KV is written before any later step reads
        it (vLLM v1 schedules chunked prefills of in-flight requests the same way). Requests
        with one token left (a decode, a prompt's last token) stay with their own set.
        Returns the budget left and whether a prompt found no free blocks for its chunk: then
        nobody is admitted in this step either (FCFS: a newer request must not take the blocks
        an older one needs; its own set's step preempts for it if it must)."""
        for request in self.running:
            if budget <= 0:
                break
            if request.virtual_engine == virtual_engine or request.num_unscheduled_tokens < 2:
                continue
            num_tokens = min(request.num_unscheduled_tokens, budget)
            if not self.block_manager.can_allocate(request.request_id, request.num_scheduled_tokens + num_tokens):
                return budget, True
            chunks.append(self._admit_chunk(request, num_tokens))
            budget -= num_tokens
            self.num_continued_prefill_chunks += 1
        return budget, False

    def _rebalance(self, virtual_engine: int, num_virtual_engines: int,
                   decode_cost: Callable[[int], float] | None = None) -> None:
        """Even out the request sets' loads (a request's load: ``decode_cost`` of its context, or
        1 without one): this set's requests, newest first, move to the least loaded set while
        that narrows the gap between the two (a load below the gap), and run at that set's next
        step. No step of this set is in flight (it is about to step); a prompt chunk of one of
        its requests may ride in another set's step, even the one that samples its next token,
        and moving it is safe: whichever set steps it skips it until that token is back. By
        count this keeps the sets within one request of each other; by cost it evens out the
        sets' decode steps, which an overlapped pipeline runs back to back (an uneven pair idles
        the stages for their difference every cycle). Sets drift apart as requests finish and
        contexts grow, and a merge resumes exchanged requests with the sets they had before."""
        load = (lambda r: 1.0) if decode_cost is None else (lambda r: decode_cost(r.num_tokens))
        loads = [0.0] * num_virtual_engines
        for r in self.running:
            # a set number from before a regroup (a split, then a merge into fewer stages): the
            # group drained before regrouping, so no step of the old sets is in flight
            r.virtual_engine %= num_virtual_engines
            loads[r.virtual_engine] += load(r)
        mine = [r for r in self.running if r.virtual_engine == virtual_engine]
        for request in reversed(mine):
            lightest = min(range(num_virtual_engines), key=loads.__getitem__)
            weight = load(request)
            if not 0 < weight < loads[virtual_engine] - loads[lightest]:
                continue  # moving it would not narrow the gap (by count: the sets are within one)
            request.virtual_engine = lightest
            loads[virtual_engine] -= weight
            loads[lightest] += weight

    def _make_room(self, request: Request, num_tokens: int, preempted: list[str],
                   virtual_engine: int | None = None) -> bool:
        """Preempt newest requests (of ``virtual_engine``'s set) until ``request`` can grow;
        False if it was preempted."""
        target = request.num_scheduled_tokens + num_tokens
        while not self.block_manager.can_allocate(request.request_id, target):
            victim = self._pop_newest(virtual_engine)
            if not (self.preemption.swaps and self._swap_out_victim(victim)):
                self.preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _pop_newest(self, virtual_engine: int | None) -> Request:
        """Remove and return the newest running request of the set (``request`` itself is one)."""
        index = next(i for i in range(len(self.running) - 1, -1, -1)
                     if virtual_engine is None or self.running[i].virtual_engine == virtual_engine)
        return self.running.pop(index)

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk], virtual_engine: int = 0) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(request.request_id, num_tokens):
                break  # FCFS: nobody overtakes the head of the queue
            host_blocks = self.swapped.get(request.request_id)
            if host_blocks is not None and not self._may_swap_in(request, host_blocks, num_tokens):
                break  # no room for its KV + chunk, or over this step's swap budget: next step
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.virtual_engine = virtual_engine
            self.running.append(request)
            chunks.append(self._admit_chunk(request, num_tokens))
            if host_blocks is not None:
                self._swap_in_admitted(request, host_blocks)
            budget -= num_tokens
        return budget

    # -- swap preemption (policy decides, the engine's Swapper copies) ---------------------------
    def _swap_out_victim(self, victim: Request) -> bool:
        """Move ``victim`` (already removed from ``running``) to the head of the queue with its KV
        bound for host blocks; False if the policy says recompute instead."""
        computed_blocks = -(-victim.num_computed_tokens // self.block_manager.block_size)
        device_blocks = tuple(self.block_manager.block_table(victim.request_id)[:computed_blocks])
        decision = self.preemption.on_preempt(len(device_blocks), self.host_pool.num_free_blocks)
        if decision is Preempt.FALLBACK:
            if not self.num_recompute_fallbacks:
                log.warning("swap space full (%d host blocks free, request %s needs %d): recomputing "
                            "instead; later fallbacks are only counted", self.host_pool.num_free_blocks,
                            victim.request_id, len(device_blocks))
            self.num_recompute_fallbacks += 1
        if decision is not Preempt.SWAP:
            return False
        host_blocks = tuple(self.host_pool.allocate(len(device_blocks)))
        self._swap_out.append(SwapOp(victim.request_id, device_blocks, host_blocks))
        # Freed now, reused in this very step: the Swapper copies them out before the forward.
        self.block_manager.free(victim.request_id)
        self.swapped[victim.request_id] = host_blocks
        victim.status = RequestStatus.WAITING  # num_computed_tokens is kept: nothing is recomputed
        victim.num_in_flight_tokens = 0  # chunks in flight belong to the old epoch: dropped
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.num_swap_preemptions += 1
        self.waiting.appendleft(victim)
        return True

    def _may_swap_in(self, request: Request, host_blocks: tuple[int, ...], num_tokens: int) -> bool:
        step_blocks = sum(len(op.host_blocks) for op in self._swap_in)
        return (self.preemption.may_swap_in(len(host_blocks), step_blocks)
                and self.block_manager.can_allocate(request.request_id, request.num_computed_tokens + num_tokens))

    def _swap_in_admitted(self, request: Request, host_blocks: tuple[int, ...]) -> None:
        """``request`` just got fresh blocks for its computed tokens + chunk: its KV goes to the
        first ones. Its host blocks are free again once the copy is queued (copies run in order)."""
        del self.swapped[request.request_id]
        table = self.block_manager.block_table(request.request_id)
        self._swap_in.append(SwapOp(request.request_id, tuple(table[:len(host_blocks)]), host_blocks))
        self.host_pool.free(host_blocks)

    def _drop_swapped(self, request_id: str) -> None:
        host_blocks = self.swapped.pop(request_id, None)
        if host_blocks is not None:
            self.host_pool.free(host_blocks)

    def _admit_chunk(self, request: Request, num_tokens: int) -> ScheduledChunk:
        start = request.num_scheduled_tokens
        self.block_manager.allocate(request.request_id, start + num_tokens)
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = time.time()
        request.num_in_flight_tokens += num_tokens  # until ``update`` applies the step's result
        return ScheduledChunk(request, num_tokens, request.metrics.num_preemptions, start=start)

    def preempt_newest(self) -> bool:
        """Preempt the newest running request (recompute later); False if none is running."""
        if not self.running:
            return False
        self.preempt(self.running.pop())
        return True

    def preempt(self, request: Request) -> None:
        """``request`` (already removed from ``running``) goes back to the head of the queue."""
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = request.num_in_flight_tokens = 0  # results in flight are dropped
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens; returns requests that finished.
        Requests no longer running are skipped: with an overlapped pipeline a step's tokens
        arrive a step later, and a request may have been aborted meanwhile, or preempted by a
        weight restore's round (a step's preemptions only take the stepping set's requests)."""
        now = time.time()
        finished = []
        for chunk in output.chunks:
            request = chunk.request
            if not self.is_current(chunk):
                continue  # aborted or preempted while its step was in flight (overlapped pipeline)
            completes = chunk.completes
            request.num_computed_tokens += chunk.num_tokens
            request.num_in_flight_tokens -= chunk.num_tokens
            if not completes:
                continue  # a partial prefill chunk: its sample is meaningless
            request.append_token(sampled[request.request_id], now)
            status = request.check_stop_token()
            if status is not None:
                self.finish(request, status)
                finished.append(request)
        return finished

    @staticmethod
    def is_current(chunk: ScheduledChunk) -> bool:
        """The chunk's request still runs on the KV the chunk was scheduled over."""
        return chunk.request.status is RequestStatus.RUNNING and chunk.epoch == chunk.request.metrics.num_preemptions

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
            self._drop_swapped(request.request_id)  # an aborted swapped request frees its host blocks
        request.status = status
        request.metrics.finished_time = time.time()
        self.block_manager.free(request.request_id)
