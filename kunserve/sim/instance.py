"""A serving unit of the simulated cluster: one instance, or a pipeline group that steps as one.

The unit owns a real ``kunserve.runtime.scheduler.Scheduler`` over a real ``BlockManager``
(pure Python, no tensors): chunked prefill, FCFS admission, newest-first preemption (recompute,
or swap with ``SwapPreemption``) are the engine's own code. The simulator only decides *when*
steps happen and how long they take (``timing.PipelineTiming``).

Life of a step: ``begin(now)`` runs ``schedule()`` (or plans a fast-forwarded stretch of quiet
steps, ``fastforward.py``) and returns when the step ends; at that time ``finish(now)`` runs
``update()`` (or materialises the stretch), one KV-exchange round if the unit is exchanging
after a merge, then the *inbox*.

An overlapped pipeline group (``PipelineTiming.steps_by_sets``) is a ``RequestSetsUnit``
(``request_sets.py``): its steps are the runtime leader's engine iterations, with steps in flight
across them; ``ClusterSim.make_unit`` picks the class.

Inbox invariant: nothing from outside (new requests, migrations, regroup orders) touches the
scheduler while a step is in flight; it is queued and applied at the next step boundary, as the
engine applies new requests before its next ``schedule()``. A stretch in flight is cut short
at the step in flight when something arrives, so the boundary comes at the same time as in
step-by-step simulation.

Snapshots (``InstanceSnapshot``, what dispatch and the policies read) are taken with the
engine's own ``LLMEngine.snapshot`` at each boundary; inside a stretch they are derived from
the stretch's arrays (only free blocks and running counts change there).
"""

from __future__ import annotations

import enum
from collections import deque

import attrs
import numpy as np

from kunserve.policy.batching import LookaheadBatcher, TokenBudgetBatcher
from kunserve.policy.cost_model import ChunkWork
from kunserve.policy.snapshot import InstanceSnapshot
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.scheduler import Scheduler, SchedulerOutput
from kunserve.sim.fastforward import DecodeStretch, materialize, plan_stretch, tokens_left
from kunserve.sim.hardware import Link
from kunserve.sim.timing import LaunchedStep, PipelineTiming, Work


class UnitState(enum.Enum):
    IDLE = "idle"  # nothing to run; starts a step as soon as its inbox gets something
    STEPPING = "stepping"  # a step (or a stretch of steps) is in flight
    PAUSED = "paused"  # at a boundary, waiting for a regroup (merge / split) to execute


@attrs.frozen
class UnitEnv:
    """What every unit of one simulation shares."""

    logs: dict  # request id -> RequestLog
    fast_forward: bool = True
    min_ff_steps: int = 2
    max_ff_steps: int = 4096
    swap_link: Link | None = None
    block_bytes: int = 0  # full-model KV block bytes (swap copies)
    exchange_overlap: bool = True  # KV exchange rounds overlap the pipeline step (coordinated)


def decode_is_one_micro_batch(batcher, num_seqs: int) -> bool:
    """True when ``batcher`` keeps any batch of at most ``num_seqs`` one-token chunks whole,
    whatever their prefixes: the token-budget batcher below its budget; the lookahead batcher
    below twice its MIN tokens (it never splits a batch that small)."""
    if batcher is None:
        return True
    if isinstance(batcher, TokenBudgetBatcher):
        return num_seqs <= batcher.max_tokens
    if isinstance(batcher, LookaheadBatcher):
        return num_seqs < 2 * batcher.min_tokens
    return False


class _EngineView:
    """The attributes ``LLMEngine.snapshot`` reads, so the sim's snapshots are the engine's."""

    def __init__(self, unit: "Unit"):
        self.block_manager, self.scheduler, self.unit = unit.bm, unit.scheduler, unit
        self.swapper = unit.swap_counters

    @property
    def runner(self):
        return self

    @property
    def exchange_pending(self) -> bool:
        return self.unit.exchanging


class SwapCounters:
    """Bytes moved by swap preemption (what the engine's ``Swapper`` counts)."""

    def __init__(self):
        self.swapped_out_bytes = self.swapped_in_bytes = 0


class Unit:
    """Invariants: ``state`` is STEPPING iff a STEP_END event with ``version`` is pending, and
    then (plain units) exactly one of ``output`` / ``stretch`` is set; ``boundary`` is the
    snapshot after the last completed step (or after the merge / split that created the unit).
    ``in_flight`` (launched, uncollected steps) is only ever non-empty in a ``RequestSetsUnit``;
    ``drain_actions`` (outside changes that need an empty pipeline) wait until it is empty."""

    steps_by_sets = False  # RequestSetsUnit: the runtime's overlapped request sets

    def __init__(self, uid: int, members: tuple[int, ...], slices: tuple[tuple[int, int], ...],
                 scheduler: Scheduler, timing: PipelineTiming, env: UnitEnv, batcher=None):
        self.uid, self.members, self.slices = uid, members, slices
        self.scheduler, self.bm = scheduler, scheduler.block_manager
        self.timing, self.env, self.batcher = timing, env, batcher
        self.state = UnitState.IDLE
        self.inbox: list = []  # callables (unit, now) applied at the next boundary
        self.output: SchedulerOutput | None = None
        self.stretch: DecodeStretch | None = None
        self.step_end: float | None = None
        self._eventful = False
        self.version = 0
        self.exchange = None  # regroup.SimLeaderExchange while KV moves after a merge
        self.pull = None  # regroup.SimWeightPull while a restore pulls the weights back
        self.pending = None  # a regroup order waiting for this unit's boundary
        self.swap_counters = SwapCounters()
        # inbox actions ever delivered, and how many of them the current ``boundary`` reflects
        self.delivered = self.boundary_delivered = 0
        self.steps_exact = self.steps_ff = self.stretches = 0
        self.busy_s = self.bubble_s = self.stage_s = 0.0  # member-seconds: computing, idle in steps, in all
        self.in_flight: deque[LaunchedStep] = deque()  # launched, not yet collected (RequestSetsUnit)
        self.drain_actions: list = []  # inbox actions waiting for an empty pipeline (a pull's start)
        self._view = _EngineView(self)
        self.boundary = self.snapshot_now()

    # -- state ---------------------------------------------------------------------------------
    @property
    def transfer(self):
        """The KV exchange or weight pull still running (one round after each step), if any."""
        for transfer in (self.exchange, self.pull):
            if transfer is not None and not transfer.done:
                return transfer
        return None

    @property
    def exchanging(self) -> bool:
        """KV or weights still moving (``InstanceSnapshot.exchanging``)."""
        return self.transfer is not None

    @property
    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.running or s.waiting or s.stalled) or self.exchanging

    def snapshot_now(self) -> InstanceSnapshot:
        return LLMEngine.snapshot(self._view, self.uid)

    def snapshot_at(self, t: float) -> InstanceSnapshot:
        """The snapshot after the last step that ended at or before ``t``."""
        stretch = self.stretch
        if stretch is None:
            return self.boundary
        k = stretch.steps_done_by(t)
        if k == 0:
            return self.boundary
        return attrs.evolve(self.boundary, num_free_blocks=max(0, int(stretch.free_after[k - 1]) - self.bm.reserved),
                            num_running=int(stretch.running_after[k - 1]))

    def candidates_at(self, t: float) -> list[tuple]:
        """(request, blocks held, tokens left) of the running, decoding requests after the last
        step that ended by ``t``, in admission order (Llumnix's migration candidates). Blocks
        are counted as ``ceil(computed / block_size)``: what a table holds at a boundary, and
        unchanged by a step in flight (which has allocated but not yet advanced ``computed``)."""
        stretch = self.stretch
        if stretch is not None and stretch.steps_done_by(t) > 0:
            return stretch.candidates_after(stretch.steps_done_by(t) - 1)
        bs = self.bm.block_size
        return [(r, -(-r.num_computed_tokens // bs), tokens_left(r))
                for r in self.scheduler.running if r.num_output_tokens > 0 and r.num_uncomputed_tokens == 1]

    # -- outside changes -------------------------------------------------------------------------
    def enqueue(self, action, drain_first: bool = False) -> None:
        """Queue ``action(unit, now)`` for the next boundary; with ``drain_first``, for the first
        boundary with no step in flight (the runtime drains before a group changes)."""
        (self.drain_actions if drain_first and self.in_flight else self.inbox).append(action)
        self.delivered += 1

    def deliver(self, action, now: float, drain_first: bool = False) -> float | None:
        """Queue ``action(unit, now)`` for the next boundary. Returns a new step-end time the
        caller must schedule (an idle unit starts now; a stretch is cut short), else None."""
        self.enqueue(action, drain_first)
        if self.state is UnitState.IDLE:
            self.refresh_boundary(now)
            return self.begin(now)
        if self.stretch is not None:
            old = self.stretch.n
            self.stretch.truncate(now)
            if self.stretch.n != old:
                self.version += 1
                self.step_end = self.stretch.end
                return self.step_end
        return None

    def refresh_boundary(self, now: float) -> None:
        """Apply the inbox and take the boundary snapshot (the unit is between steps)."""
        self._apply_inbox(now)
        self.boundary = self.snapshot_now()
        self.boundary_delivered = self.delivered - len(self.drain_actions)

    def _apply_inbox(self, now: float) -> None:
        if self.drain_actions and not self.in_flight:  # drained: they may change the group now
            self.inbox[:0], self.drain_actions = self.drain_actions, []
        while self.inbox:
            actions, self.inbox = self.inbox, []
            for action in actions:
                action(self, now)

    # -- stepping ------------------------------------------------------------------------------
    def begin(self, now: float) -> float | None:
        """Start the next step (or stretch) at ``now``; returns its end, or None (idle/paused)."""
        self.output = self.stretch = self.step_end = None
        if self.pending is not None:
            self.state = UnitState.PAUSED
            return None
        if self.env.fast_forward and not self.exchanging and not self.scheduler.stalled:
            stretch = self._plan_stretch(now)
            if stretch is not None:
                self.stretch, self.state = stretch, UnitState.STEPPING
                self.stretches += 1
                self.version += 1
                self.step_end = stretch.end
                return self.step_end
        if not self.has_work:
            self.state = UnitState.IDLE
            return None
        before = len(self.scheduler.running)
        output = self.scheduler.schedule()
        if not output.chunks and not self.exchanging:
            self.state = UnitState.IDLE  # e.g. a head request that can never fit: nothing runs
            return None
        self.output, self.state = output, UnitState.STEPPING
        self.version += 1
        self.step_end = now + self._duration(output, before)
        return self.step_end

    def _plan_stretch(self, now: float) -> DecodeStretch | None:
        if not decode_is_one_micro_batch(self.batcher, len(self.scheduler.running)):
            return None
        stretch = plan_stretch(self.scheduler, self.bm, self.timing.decode_seconds, now,
                               self.env.max_ff_steps, self.env.min_ff_steps)
        if stretch is not None:
            self._account_decode(stretch.alive, stretch.prefix)
        return stretch

    def _account_decode(self, alive, prefix) -> None:
        g = self.timing.stages
        busy = float(np.sum(self.timing.decode_busy(alive, prefix)))
        held = g * float(np.sum(self.timing.decode_span(alive, prefix)))  # member-seconds of the steps
        self._charge(busy, held - busy, ())

    def _charge(self, busy: float, bubble: float, outputs) -> None:
        """Member-seconds computed (``busy``) and idle (``bubble``) while the unit's members were
        held by the steps of ``outputs`` (the SchedulerOutputs involved; empty for decode-only
        stretches). One place, so a subclass can split the tally by step kind."""
        self.busy_s += busy
        self.bubble_s += bubble
        self.stage_s += busy + bubble

    def _duration(self, output: SchedulerOutput, running_before: int) -> float:
        """Seconds of this step: compute (+ swap copies, + an exchange round)."""
        chunks = output.chunks
        swaps = output.swapped_out + output.swapped_in
        self._eventful = bool(output.preempted or swaps or self.exchanging or len(chunks) != running_before
                              or any(c.num_tokens != 1 for c in chunks))
        if chunks and all(c.num_tokens == 1 for c in chunks) and decode_is_one_micro_batch(self.batcher, len(chunks)):
            # the very function a fast-forwarded stretch uses, so both give the same bits
            alive = np.array([len(chunks)], dtype=np.int64)
            prefix = np.array([sum(c.start for c in chunks)], dtype=np.int64)
            seconds = self.timing.decode_seconds(alive, prefix)[0]
            self._account_decode(alive, prefix)
        else:
            step = self.timing.step_seconds(self._micro_batches(chunks), len(chunks)) if chunks else None
            seconds = step.seconds if step else self.timing.overhead_s
            if step:
                self._charge(step.busy, step.bubble, (output,))
        if self.exchanging:
            round_s = self.transfer.next_round_seconds()
            seconds = max(seconds, round_s) if self.env.exchange_overlap else seconds + round_s
        if swaps:
            seconds += self._swap_seconds(output)
        return seconds

    def _micro_batches(self, chunks) -> list:
        if self.batcher is None:  # the cost models read .prefix and .num_tokens only
            return [[Work(c.start, c.num_tokens) for c in chunks]]
        return self.batcher.form([ChunkWork(c.request.request_id, c.start, c.num_tokens)
                                  for c in chunks])

    def _swap_seconds(self, output: SchedulerOutput) -> float:
        """Swap copies run before the forward (swap-outs free blocks this step reuses; the
        forward waits for its swap-ins): they add to the step."""
        out_bytes = sum(len(op.device_blocks) for op in output.swapped_out) * self.env.block_bytes
        in_bytes = sum(len(op.device_blocks) for op in output.swapped_in) * self.env.block_bytes
        self.swap_counters.swapped_out_bytes += out_bytes
        self.swap_counters.swapped_in_bytes += in_bytes
        return self.env.swap_link.seconds(out_bytes) + self.env.swap_link.seconds(in_bytes)

    def finish(self, now: float) -> tuple[bool, list]:
        """The step (or stretch) ending at ``now``: returns (eventful, finished requests)."""
        logs = self.env.logs
        if self.stretch is not None:
            finished = materialize(self.stretch, self.scheduler, self.bm, logs)
            self.steps_ff += self.stretch.n
            eventful = False
        else:
            output = self.output
            sampled = {c.request.request_id: 0 for c in output.chunks if c.completes}
            finished = self.scheduler.update(output, sampled)
            for request_id in sampled:
                logs[request_id].add(now)
            self.steps_exact += 1
            eventful = self._eventful
            if self.exchanging:
                self.transfer.run_round(now)
        self._log_finished(finished)
        self.output = self.stretch = None
        self.refresh_boundary(now)
        return eventful, finished

    def _log_finished(self, finished) -> None:
        logs = self.env.logs
        for request in finished:
            log = logs[request.request_id]
            # its last token's step end: inside a stretch that is before ``now``
            log.finished_at, log.preemptions, log.unit = log.last, request.metrics.num_preemptions, self.uid
            log.finishes += 1
