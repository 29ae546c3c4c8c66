"""The discrete-event cluster: arrivals, dispatch, unit steps, the monitor, policy hooks.

Events, in time order; at equal times step ends come first (so a snapshot or an arrival at the
moment a step ends sees that step done), then timers, monitor ticks, arrivals:

- STEP_END (unit): ``Unit.finish`` (``update`` or a stretch materialised, an exchange round,
  the inbox), then the next ``Unit.begin``. An *eventful* step (one that admitted, preempted,
  swapped or exchanged) refreshes that unit's snapshot and runs the policy's step hook.
- TIMER: a mechanism's delay ran out (a merge's remap, a restore's transfers, a migration stage).
- TICK (every ``monitor_interval_s``): every unit's snapshot is refreshed (the state after its
  last completed step, also inside fast-forwarded stretches), a timeline sample is taken, and
  the policy's monitor runs (drop / restore, migration planning).
- ARRIVAL: the request is dispatched by the real ``LoadBalancingDispatcher`` on the current
  snapshots and delivered to the unit's inbox.

The policy objects decide; this module and the mechanism modules (``regroup``, ``migration``)
only execute and charge time. ``lockstep=True`` instead steps every unit together, each
cluster step lasting as long as the slowest unit's step, like the CPU runtime's
``ClusterDriver`` (validation against real multi-rank runs); snapshots then refresh and the
policies run after every cluster step, as rank 0 does. A cluster step is one engine iteration
of every unit: for a group stepped by request sets, one launch and at most one collect (its
stages keep computing the steps in flight across cluster steps).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time

from kunserve.policy.dispatch import LoadBalancingDispatcher
from kunserve.policy.drop import balanced_cuts
from kunserve.policy.migration import MigrationPlanner, MigrationRules
from kunserve.policy.preemption import SwapPreemption
from kunserve.policy.snapshot import ClusterSnapshot
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import Scheduler
from kunserve.runtime.swap import HostBlockPool
from kunserve.sampling_params import SamplingParams
from kunserve.sim.config import SimConfig
from kunserve.sim.hardware import LINKS
from kunserve.sim.instance import Unit, UnitEnv, UnitState
from kunserve.sim.request_sets import RequestSetsUnit
from kunserve.sim.migration import Migrations
from kunserve.sim.records import RequestLog
from kunserve.sim.regroup import Regroups

log = logging.getLogger(__name__)

STEP_END, TIMER, TICK, ARRIVAL = 0, 1, 2, 3


class ClusterSim:
    """One simulation. Invariants: ``units`` maps each unit's id (its leader instance) to the
    unit; ``snapshots`` holds one snapshot per unit, what dispatch and the policies read; every
    request is in exactly one unit's scheduler or inbox (or in flight between two units during
    a migration) until it finishes."""

    def __init__(self, config: SimConfig, trace):
        self.config, self.trace = config, trace
        self.logs: dict[str, RequestLog] = {}
        self.env = UnitEnv(self.logs, config.fast_forward, swap_link=LINKS[config.swap_link],
                           block_bytes=config.full_block_bytes, exchange_overlap=config.exchange_overlap)
        self.units: dict[int, Unit] = {}
        self.snapshots: dict = {}
        self.dispatcher = LoadBalancingDispatcher()
        self.retired: list[Unit] = []  # units replaced by a merge or split (their counters)
        self.heap: list = []
        self._seq = itertools.count()
        self._versions = itertools.count(1)
        self.regroups = Regroups(config) if config.policy == "kunserve" else None
        self.migrations = (Migrations(MigrationPlanner(MigrationRules()), config)
                           if config.policy == "llumnix" else None)
        self.samples: list[dict] = []
        self._next_sample = 0.0
        self.finished = 0
        self.now = 0.0
        self._params: dict[int, SamplingParams] = {}
        self._build_units()

    # -- construction -----------------------------------------------------------------------------
    # the unit classes: plain, and a group stepped by request sets (a subclass may count more)
    unit_class, sets_unit_class = Unit, RequestSetsUnit

    def make_unit(self, uid, members, slices, scheduler, batcher) -> Unit:
        timing = self.config.timing(tuple(slices))
        cls = self.sets_unit_class if timing.steps_by_sets else self.unit_class
        unit = cls(uid, tuple(members), tuple(slices), scheduler, timing, self.env, batcher)
        unit.version = next(self._versions)
        return unit

    def _scheduler(self, num_blocks: int, members: int = 1) -> Scheduler:
        cfg = self.config
        bm = BlockManager(num_blocks, cfg.block_size)
        seqs, tokens = cfg.limits(members)
        if cfg.policy == "swap":
            policy = SwapPreemption(cfg.full_block_bytes, cfg.swap_bytes_per_step)
            return Scheduler(bm, seqs, tokens, policy, HostBlockPool(cfg.swap_space_bytes // cfg.full_block_bytes))
        return Scheduler(bm, seqs, tokens)

    def _build_units(self) -> None:
        cfg, layers = self.config, self.config.shape.num_layers
        if cfg.policy == "vllm-pp":
            size = cfg.pipeline_size
            slices = balanced_cuts(layers, size)
            blocks = min(cfg.member_blocks(s) for s in slices)
            batcher = cfg.micro_batcher("vllm-pp")
            for first in range(0, cfg.instances, size):
                members = tuple(range(first, first + size))
                self._add(self.make_unit(first, members, slices, self._scheduler(blocks, size), batcher))
        else:
            for i in range(cfg.instances):
                self._add(self.make_unit(i, (i,), ((0, layers),), self._scheduler(cfg.instance_blocks), None))

    def _add(self, unit: Unit) -> None:
        self.units[unit.uid] = unit
        self.snapshots[unit.uid] = unit.boundary

    # -- what policies read -------------------------------------------------------------------------
    def cluster_snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(tuple(self.snapshots[uid] for uid in sorted(self.snapshots)))

    def _refresh(self, unit: Unit, snapshot) -> None:
        """A new snapshot of ``unit``; dispatch's pending blocks for it are dropped only when
        the snapshot reflects every request dispatched to it (the runtime's report after a
        step always does, since requests join the engine at once)."""
        self.snapshots[unit.uid] = snapshot
        if unit.boundary_delivered == unit.delivered:
            self.dispatcher.observe(unit.uid)

    # -- event plumbing -------------------------------------------------------------------------
    def _push(self, t: float, kind: int, key: int, payload) -> None:
        heapq.heappush(self.heap, (t, kind, key, next(self._seq), payload))

    def _push_step(self, unit: Unit, end: float | None) -> None:
        if end is not None:
            unit.version = next(self._versions)
            self._push(end, STEP_END, unit.uid, (unit, unit.version))

    def timer(self, t: float, callback) -> None:
        self._push(t, TIMER, 0, callback)

    def deliver(self, uid: int, action, now: float, drain_first: bool = False) -> None:
        """Queue ``action(unit, now)`` for ``uid``'s next boundary (starting an idle unit); with
        ``drain_first`` for its first boundary without pipeline steps in flight."""
        unit = self.units[uid]
        if self.config.lockstep:  # every unit is between cluster steps: the next begin applies it
            unit.enqueue(action, drain_first)
            return
        self._push_step(unit, unit.deliver(action, now, drain_first))

    def interrupt(self, uid: int, now: float) -> None:
        """Bring ``uid`` to a boundary soon: an idle unit pauses at once if it has a pending
        regroup; a stretch is cut short after the step in flight."""
        unit = self.units[uid]
        if unit.state is UnitState.IDLE:
            unit.state = UnitState.PAUSED if unit.pending is not None else UnitState.IDLE
            return
        if unit.stretch is not None:
            old = unit.stretch.n
            unit.stretch.truncate(now)
            if unit.stretch.n != old:
                unit.step_end = unit.stretch.end
                self._push_step(unit, unit.step_end)

    def replace_units(self, old: list[Unit], new: list[Unit], active_at: float) -> None:
        for unit in old:
            self.retired.append(unit)
            del self.units[unit.uid]
            self.snapshots.pop(unit.uid, None)
            self.dispatcher.observe(unit.uid)
        for unit in new:
            unit.state = UnitState.PAUSED  # until its remap / transfers are done
            self._add(unit)
        self.regroups.activating += 1

        def activate(t: float) -> None:
            self.regroups.activating -= 1
            for unit in new:
                unit.state = UnitState.IDLE
                unit.refresh_boundary(t)
                self._refresh(unit, unit.boundary)
                if not self.config.lockstep:
                    self._start(unit, t)

        self.timer(active_at, activate)

    # -- handlers -------------------------------------------------------------------------------------
    def _start(self, unit: Unit, now: float) -> None:
        end = unit.begin(now)
        self._push_step(unit, end)
        if unit.state is UnitState.PAUSED and self.regroups is not None:
            self.regroups.try_execute(self, now)

    def _on_step_end(self, unit: Unit, now: float) -> None:
        eventful, finished = unit.finish(now)
        self.finished += len(finished)
        if eventful:
            self._refresh(unit, unit.boundary)
            if self.regroups is not None:
                self.regroups.on_eventful(self, unit, now)
        self._start(unit, now)

    def _on_tick(self, now: float) -> None:
        for unit in list(self.units.values()):
            snapshot = unit.snapshot_at(now)
            if snapshot is not self.snapshots[unit.uid]:
                self._refresh(unit, snapshot)
        if now >= self._next_sample:
            self._sample(now)
            self._next_sample = now + self.config.sample_interval_s
        if self.regroups is not None:
            self.regroups.on_monitor(self, now)
        if self.migrations is not None:
            self.migrations.on_monitor(self, now)

    def _params_for(self, max_tokens: int) -> SamplingParams:
        params = self._params.get(max_tokens)
        if params is None:
            params = self._params[max_tokens] = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        return params

    def _on_arrival(self, i: int, now: float) -> None:
        prompt, output = self.trace.prompt_lens[i], self.trace.output_lens[i]
        request_id = f"r{i}"
        request = Request(request_id, [0] * prompt, self._params_for(output), prompt + output, arrival_time=now)
        self.logs[request_id] = RequestLog(now, prompt, output, self.config.keep_token_times)
        uid = self.dispatcher.choose(self.cluster_snapshot(), -(-prompt // self.config.block_size))
        self.deliver(uid, lambda unit, _t: unit.scheduler.add(request), now)

    def _sample(self, now: float) -> None:
        """A timeline point shaped like ``bench.compare.sample_from_metrics`` (for the plots)."""
        instances = {str(uid): {"kv_cache_total_blocks": s.num_blocks, "memory_demand_blocks": s.memory_demand_blocks,
                                "preemptions_total": s.num_preemptions, "requests_waiting": s.num_waiting}
                     for uid, s in self.snapshots.items()}
        drops = self.regroups.merges if self.regroups else 0
        restores = self.regroups.splits if self.regroups else 0
        self.samples.append({"t": now, "instances": instances, "drops_total": drops, "restores_total": restores})

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> "SimRun":
        started = time.perf_counter()
        if self.config.lockstep:
            self._run_lockstep()
        else:
            self._run_events()
        return SimRun(self, time.perf_counter() - started)

    def _run_events(self) -> None:
        total = len(self.trace)
        if total:
            self._push(self.trace.arrivals[0], ARRIVAL, 0, 0)
        self._push(0.0, TICK, 0, None)
        while self.heap:
            t, kind, _key, _seq, payload = heapq.heappop(self.heap)
            self.now = t
            if kind == STEP_END:
                unit, version = payload
                if self.units.get(unit.uid) is unit and unit.version == version and unit.state is UnitState.STEPPING:
                    self._on_step_end(unit, t)
            elif kind == TIMER:
                payload(t)
            elif kind == TICK:
                self._on_tick(t)
                if self.finished < total and self._progress_possible():
                    self._push(t + self.config.monitor_interval_s, TICK, 0, None)
            else:
                self._on_arrival(payload, t)
                if payload + 1 < total:
                    self._push(self.trace.arrivals[payload + 1], ARRIVAL, 0, payload + 1)
        if self.finished < total:
            log.warning("%d of %d requests never finished (a request larger than an instance's KV?)",
                        total - self.finished, total)

    def _progress_possible(self) -> bool:
        """Something is stepping, scheduled, or paused for a regroup (else only ticks remain)."""
        return any(kind != TICK for _t, kind, *_ in self.heap) or any(
            u.state is not UnitState.IDLE for u in self.units.values())

    def _run_lockstep(self) -> None:
        """Every unit steps together; a cluster step lasts as long as its slowest unit's step."""
        total, arrivals, i, t = len(self.trace), self.trace.arrivals, 0, 0.0
        while self.finished < total:
            while i < total and arrivals[i] <= t:
                self._on_arrival(i, t)
                i += 1
            while self.heap and self.heap[0][0] <= t:  # timers (activations) due by now
                _t, _kind, _key, _seq, callback = heapq.heappop(self.heap)
                callback(t)
            begun = []
            for unit in list(self.units.values()):
                if unit.state is UnitState.IDLE or unit.state is UnitState.STEPPING:
                    unit._apply_inbox(t)
                    end = unit.begin(t)
                    if end is not None:
                        begun.append((unit, end))
                    elif unit.state is UnitState.PAUSED and self.regroups is not None:
                        self.regroups.try_execute(self, t)
            if not begun:
                upcoming = [arrivals[i]] if i < total else []
                upcoming += [self.heap[0][0]] if self.heap else []
                if not upcoming:
                    break
                t = max(t, min(upcoming))
                continue
            t = max(end for _, end in begun) + self.config.lockstep_overhead_s
            for unit, _end in begun:
                _eventful, finished = unit.finish(t)
                self.finished += len(finished)
            for unit in self.units.values():
                self._refresh(unit, unit.boundary)
            self._on_tick(t)
        if self.finished < total:
            log.warning("%d of %d requests never finished", total - self.finished, total)


class SimRun:
    """What a finished simulation leaves: logs, samples, counters and its wall time."""

    def __init__(self, sim: ClusterSim, wall_s: float):
        self.config, self.logs, self.samples = sim.config, sim.logs, sim.samples
        self.wall_s = wall_s
        self.units = list(sim.units.values())
        self.regroups, self.migrations = sim.regroups, sim.migrations
        self.end_time = max((log.last for log in self.logs.values() if log.last is not None), default=0.0)
        self.unfinished = sum(1 for log in self.logs.values() if log.finished_at is None)
        self.unfinished += len(sim.trace) - len(self.logs)
        every = [*sim.units.values(), *sim.retired]
        self.steps_exact = sum(u.steps_exact for u in every)
        self.steps_ff = sum(u.steps_ff for u in every)
        self.stretches = sum(u.stretches for u in every)
        self.bubble_s = sum(u.bubble_s for u in every)
        self.stage_s = sum(u.stage_s for u in every)
        self.swapped_out_bytes = sum(u.swap_counters.swapped_out_bytes for u in every)
        self.swapped_bytes = self.swapped_out_bytes + sum(u.swap_counters.swapped_in_bytes for u in every)
        self.preemptions = sum(log.preemptions for log in self.logs.values())
