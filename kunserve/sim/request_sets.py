"""A pipeline group stepped by request sets, as the runtime's overlapped leader steps it.

``LLMEngine._overlapped_step``: a unit step is one *engine iteration*: schedule the next request
set, launch its step into stage 0 (``timing.StageClocks`` carry each stage's free time from step
to step), and collect the oldest step in flight once more than ``stages - 1`` are; ``finish``
applies the *collected* step's output, not the launched one, then the transfer round that pairs
with it. A regroup order (or a restore's pull) first drains: iterations that only collect, until
nothing is in flight, as ``LLMEngine.drain`` does before the group changes.
"""

from __future__ import annotations

from kunserve.runtime.scheduler import Scheduler, SchedulerOutput
from kunserve.sim.instance import Unit, UnitState, decode_is_one_micro_batch
from kunserve.sim.timing import LaunchedStep, StageClocks


class RequestSetsUnit(Unit):
    """Invariants (besides ``Unit``'s): between iterations at most ``stages - 1`` steps are in
    flight; the unit is never IDLE or PAUSED with steps in flight; ``_collected`` holds the steps
    the iteration in flight applies at its end."""

    steps_by_sets = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clocks = StageClocks(self.timing.stages)
        self._next_set = 0
        self._collected: list[LaunchedStep] = []
        self._round_due = False  # the iteration in flight runs a transfer round at its end

    def begin(self, now: float) -> float | None:
        self.output = self.stretch = self.step_end = None
        return self._begin_iteration(now)

    def finish(self, now: float) -> tuple[bool, list]:
        return self._finish_iteration(now)

    def _begin_iteration(self, now: float) -> float | None:
        """One iteration of the runtime's overlapped leader: drain (collect only) if the group is
        about to change or has nothing left to run, else launch the next set's step and collect
        the oldest step once more than ``stages - 1`` are in flight. Returns the iteration's end."""
        self._collected, self._round_due = [], False
        if self.pending is not None or self.drain_actions or not self.has_work:
            return self._drain_iteration(now)
        sets = self.timing.stages
        virtual_engine = self._next_set % sets
        running_before = len(self.scheduler.running)
        output = self.scheduler.schedule(virtual_engine, sets, getattr(self.batcher, "decode_cost", None))
        if not (output.chunks or self.scheduler.running or self.exchanging):
            return self._drain_iteration(now)  # e.g. a head request that can never fit: nothing runs
        self._next_set = (virtual_engine + 1) % sets
        swaps = output.swapped_out + output.swapped_in
        self._eventful = bool(output.preempted or swaps or self.exchanging
                              or len(self.scheduler.running) != running_before
                              or any(c.num_tokens != 1 for c in output.chunks))
        # the leader's host work (scheduling, applying the previous result) and any swap copies
        # come before stage 0 starts this step's forward
        start = now + self.timing.host_seconds(len(output.chunks))
        if swaps:
            start += self._swap_seconds(output)
        launched = self.clocks.launch(self.timing, self._stage_parts(output.chunks), start, output)
        self.in_flight.append(launched)
        self.output = output
        end = self._collect(now, launched.stage0_done, len(self.in_flight) - (sets - 1))
        outputs = (output, *(step.output for step in self._collected))
        self._charge(launched.busy, sets * (end - now) - launched.busy, outputs)
        return self._stepping_until(end)

    def _drain_iteration(self, now: float) -> float | None:
        """Collect without launching (``LLMEngine.drain``); at an empty pipeline the unit pauses
        for its regroup order or idles. While a transfer runs, one step per iteration, as each
        collect is followed by its round."""
        if not self.in_flight:
            self.state = UnitState.PAUSED if self.pending is not None else UnitState.IDLE
            return None
        self._eventful = False
        count = 1 if self.transfer is not None else len(self.in_flight)
        end = self._collect(now, now, count)
        self._charge(0.0, self.timing.stages * (end - now), tuple(step.output for step in self._collected))
        return self._stepping_until(end)

    def _collect(self, now: float, end: float, count: int) -> float:
        """Take the ``count`` oldest steps in flight (their outputs are applied at ``finish``);
        the iteration ends when stage 0 is done (``end``) and their results are back, plus one
        transfer round if any was collected: it overlaps the iteration from its start with
        ``exchange_overlap`` (the coordinated exchange sends KV between activations), else the
        leader runs it after the collect."""
        for _ in range(max(0, count)):
            step = self.in_flight.popleft()
            self._collected.append(step)
            end = max(end, step.result_at)
        if self._collected and self.transfer is not None:
            round_s = self.transfer.next_round_seconds()
            end = max(end, now + round_s) if self.env.exchange_overlap else end + round_s
            self._round_due = True
        return end

    def _stepping_until(self, end: float) -> float:
        self.state = UnitState.STEPPING
        self.version += 1
        self.step_end = end
        return end

    def _stage_parts(self, chunks) -> list[tuple[float, int]]:
        """[(whole-forward seconds, tokens)] of the step's micro-batches, in pipeline order. A
        decode step the batcher keeps whole is priced in closed form (no ChunkWork lists)."""
        if not chunks:
            return []
        if all(c.num_tokens == 1 for c in chunks) and decode_is_one_micro_batch(self.batcher, len(chunks)):
            prefix = sum(c.start for c in chunks)
            return [(float(self.timing.cost.decode_seconds(len(chunks), prefix)), len(chunks))]
        return [(self.timing.cost.batch_seconds(mb), sum(c.num_tokens for c in mb))
                for mb in self._micro_batches(chunks)]

    def _finish_iteration(self, now: float) -> tuple[bool, list]:
        """The iteration ending at ``now``: apply the collected steps' outputs, run the transfer
        round that pairs with them, then the inbox (and, once drained, the drain actions)."""
        finished = []
        for step in self._collected:
            finished += self._apply_collected(step.output, now)
        if self._round_due:
            self.transfer.run_round(now)
        self.steps_exact += 1
        self._log_finished(finished)
        self._collected, self._round_due, self.output = [], False, None
        self.refresh_boundary(now)
        return self._eventful, finished

    def _apply_collected(self, output: SchedulerOutput, now: float) -> list:
        """``LLMEngine._apply``: a token for each completing chunk whose request still runs on
        the KV it was scheduled over (one preempted meanwhile gets none); ``update`` skips the rest."""
        logs = self.env.logs
        tokens = [c.request.request_id for c in output.chunks if Scheduler.is_current(c) and c.completes]
        finished = self.scheduler.update(output, {request_id: 0 for request_id in tokens})
        for request_id in tokens:
            logs[request_id].add(now)
        return finished
