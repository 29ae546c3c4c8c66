"""Fast-forwarding decode stretches: many scheduler steps priced and applied at once.

A *quiet* step is one in which ``Scheduler.schedule()`` would give every running request exactly
one token, preempt nothing and admit nothing. Requests may finish in it (``update`` frees their
blocks). While nothing from outside touches the unit, a run of quiet steps is fully determined
by the running requests' token counts, block tables and length limits, so it can be computed in
closed form with numpy instead of calling the scheduler once per step:

- request ``r`` with ``T_r`` tokens (``T_r - 1`` computed) and ``left_r`` tokens still to
  generate takes part in steps ``0 .. f_r`` with ``f_r = left_r - 1`` and finishes in step ``f_r``;
- in step ``j`` it grows its allocation to ``T_r + j`` tokens, so it takes a new block in steps
  ``o_r, o_r + bs, ...`` where ``o_r = max(0, have_r bs - T_r + 1)`` for ``have_r`` blocks held;
- step ``j`` succeeds without preemption iff the blocks taken in it fit in what is free at its
  start minus ``reserved`` (``BlockManager.can_allocate`` for each request in turn);
- a waiting head request cannot be admitted while free blocks only shrink: if it does not fit
  at the start, the stretch may run until the first finish (which frees blocks), not beyond.

``plan_stretch`` returns the stretch (or None when fewer than ``min_steps`` quiet steps are
certain); ``materialize`` applies its first ``n`` steps to the real ``Request``,
``BlockManager`` and ``Scheduler`` objects, through their own methods (``allocate``,
``check_stop_token``, ``finish``), so the state afterwards equals step-by-step simulation.
Step durations come from the same vectorised function the exact path uses for one-token steps,
and end times are accumulated in the same order, so times agree to the last bit.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right

import attrs
import numpy as np

from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import Scheduler


def tokens_left(request: Request) -> int:
    """Tokens ``request`` may still generate (its ``max_tokens`` and ``max_total_tokens``)."""
    by_total = request.max_total_tokens - request.num_tokens
    max_tokens = request.params.max_tokens
    return by_total if max_tokens is None else min(by_total, max_tokens - request.num_output_tokens)


@attrs.define
class DecodeStretch:
    """``n`` quiet steps starting at ``start``. Arrays are indexed by request (scheduler order)
    or by step; ``ends[j]`` is when step ``j`` ends, ``free_after[j]`` / ``running_after[j]``
    the free blocks / running requests after its ``update``."""

    start: float
    requests: list
    tokens: np.ndarray  # [R] tokens at the start
    blocks: np.ndarray  # [R] blocks held at the start
    finish_step: np.ndarray  # [R] step in which each samples its last token
    ends: np.ndarray  # [n]
    alive: np.ndarray  # [n] requests decoding in each step
    prefix: np.ndarray  # [n] Σ prefixes of each step's chunks
    free_after: np.ndarray  # [n]
    running_after: np.ndarray  # [n]
    n: int
    block_size: int

    @property
    def end(self) -> float:
        return float(self.ends[self.n - 1])

    def steps_done_by(self, t: float) -> int:
        """Steps whose end is <= ``t`` (a step ending exactly at ``t`` counts as done: step ends
        are processed before any other event at the same time)."""
        return bisect_right(self.ends, t, 0, self.n)

    def truncate(self, t: float) -> None:
        """Stop after the step in flight at ``t`` (it completes as planned)."""
        self.n = min(self.n, self.steps_done_by(t) + 1)

    def candidates_after(self, k: int) -> list[tuple[Request, int, int]]:
        """(request, blocks held, tokens left) of the requests still running after step ``k``."""
        out = []
        for i, r in enumerate(self.requests):
            f = int(self.finish_step[i])
            if f > k:
                # after step k it has computed tokens[i] + k tokens
                out.append((r, -(-(int(self.tokens[i]) + k) // self.block_size), f - k))
        return out


def plan_stretch(scheduler: Scheduler, bm: BlockManager, decode_seconds, now: float, max_steps: int,
                 min_steps: int) -> DecodeStretch | None:
    """The quiet steps that certainly follow, or None if fewer than ``min_steps``.
    ``decode_seconds(alive, prefix)`` prices one-token steps elementwise. The caller guarantees
    nothing else changes the unit (no exchange, no stalled requests)."""
    running = scheduler.running
    count = len(running)
    if not count or count > scheduler.max_num_batched_tokens:
        return None
    if scheduler.waiting and _may_admit(scheduler, bm, count):
        return None
    rows = []
    for r in running:  # one pass: (tokens, blocks held, tokens left) of each
        if r.num_uncomputed_tokens != 1:
            return None
        rows.append((r.num_tokens, len(bm.block_table(r.request_id)), tokens_left(r)))
    bs = bm.block_size
    tokens, have, finish = np.array(rows, dtype=np.int64).T
    finish = finish - 1
    assert finish.min() >= 0, "a running request with nothing left to generate should have finished"
    horizon = min(max_steps, int(finish.max()) + 1)
    if scheduler.waiting:
        horizon = min(horizon, int(finish.min()) + 1)  # the first finish may let the head in
    if horizon < min_steps:
        return None

    last = np.minimum(finish, horizon - 1)  # last step of each inside the horizon
    first_alloc = np.maximum(0, have * bs - tokens + 1)
    alloc = _allocations(first_alloc, last, bs, horizon)
    done = finish < horizon
    finished_in = np.bincount(finish[done], minlength=horizon)[:horizon]
    held_at_finish = np.maximum(have, -(-(tokens + finish) // bs))
    freed = np.bincount(finish[done], weights=held_at_finish[done], minlength=horizon)[:horizon].astype(np.int64)
    ended_before = np.concatenate(([0], np.cumsum(finished_in)[:-1]))
    alive = count - ended_before
    computed = tokens - 1
    computed_left = computed.sum() - np.concatenate(
        ([0], np.cumsum(np.bincount(finish[done], weights=computed[done], minlength=horizon)[:horizon])[:-1]
         .astype(np.int64)))
    steps = np.arange(horizon, dtype=np.int64)
    prefix = computed_left + steps * alive

    free0, reserved = bm.num_free_blocks, bm.reserved
    free_start = free0 - np.concatenate(([0], np.cumsum(alloc)[:-1])) + np.concatenate(([0], np.cumsum(freed)[:-1]))
    fails = np.flatnonzero(free_start - reserved < alloc)
    n = int(fails[0]) if fails.size else horizon
    if n < min_steps:
        return None
    durations = decode_seconds(alive[:n], prefix[:n])
    ends = np.cumsum(np.concatenate(([now], durations)))[1:]
    return DecodeStretch(now, list(running), tokens, have, finish, ends, alive[:n], prefix[:n],
                         (free_start - alloc + freed)[:n], (alive - finished_in)[:n], n, bs)


def _may_admit(scheduler: Scheduler, bm: BlockManager, running: int) -> bool:
    """Could the next schedule() admit the waiting head after decoding ``running`` requests?
    (``_admit_waiting``'s own tests, with its budget; swapped heads pass the same first test.)"""
    budget = scheduler.max_num_batched_tokens - running
    if budget <= 0 or running >= scheduler.max_num_seqs:
        return False
    head = scheduler.waiting[0]
    return bm.can_allocate(head.request_id, min(head.num_uncomputed_tokens, budget))


def _allocations(first: np.ndarray, last: np.ndarray, bs: int, horizon: int) -> np.ndarray:
    """alloc[j] = #{r : first_r <= j <= last_r and j ≡ first_r (mod bs)}: one counting table
    per residue class mod ``bs``, built with difference arrays."""
    table = np.zeros((bs, horizon + 1), dtype=np.int64)
    valid = first <= last
    residue = first[valid] % bs
    np.add.at(table, (residue, first[valid]), 1)
    np.add.at(table, (residue, last[valid] + 1), -1)
    table = np.cumsum(table, axis=1)
    steps = np.arange(horizon)
    return table[steps % bs, steps]


def materialize(stretch: DecodeStretch, scheduler: Scheduler, bm: BlockManager, logs: dict) -> list[Request]:
    """Apply the stretch's first ``stretch.n`` steps; returns the requests that finished.

    Requests that finish go first (in finish order), then the others: every intermediate free
    count is then at least what step-by-step execution had at the same point, so no
    ``allocate`` can fail (block *ids* differ from step-by-step order; counts do not)."""
    n, bs = stretch.n, stretch.block_size
    ends = stretch.ends[:n].tolist()
    order = sorted(range(len(stretch.requests)), key=lambda i: (int(stretch.finish_step[i]) >= n,
                                                                   int(stretch.finish_step[i]), i))
    finished = []
    for i in order:
        request = stretch.requests[i]
        f, have = int(stretch.finish_step[i]), int(stretch.blocks[i])
        steps = min(f, n - 1) + 1
        request.token_ids.extend(itertools.repeat(0, steps))
        request.num_computed_tokens += steps
        if -(-request.num_computed_tokens // bs) > have:  # it crossed a block boundary
            bm.allocate(request.request_id, request.num_computed_tokens)
        logs[request.request_id].add_list(ends, steps)
        if f < n:
            status = request.check_stop_token()
            assert status is not None and status.finished, f"{request.request_id} should have finished"
            scheduler.finish(request, status)
            finished.append(request)
    return finished
