"""Data-parallel cluster: one instance per rank, stepped in lockstep by rank 0.

Rank 0 runs the ``ClusterDriver``: it owns the global view (one ``InstanceSnapshot`` per
instance), dispatches each new request to an instance with the dispatch policy, and advances
the cluster one step at a time: send every worker a ``StepCommand`` (new requests, aborts),
step its own instance, then collect every worker's ``StepReport`` (outputs + snapshot).
Workers (ranks >= 1) run ``run_rank``: receive a command, apply it, step, report. Under the
kunserve policy the ``DropController`` turns overload into merge orders: the named ranks form
a pipeline group in the next step (``regroup.merge_into_group``) and serve as one instance.

The driver has the same surface as ``LLMEngine`` (``add_request``, ``abort_request``, ``step``,
``has_unfinished_requests``), so the async front end drives one engine or a cluster alike.
Lockstep keeps every instance's view one step fresh and is what pipelined groups need later.
"""

from __future__ import annotations

import logging
import traceback

import attrs

from kunserve.outputs import RequestOutput
from kunserve.policy.dispatch import LoadBalancingDispatcher
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot
from kunserve.runtime.drop_controller import DropController
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.kv_exchange import ExchangeProgress
from kunserve.runtime.migration import (MigrationCommand, MigrationCoordinator, MigrationReport, RankMigrations,
                                        run_migrations)
from kunserve.runtime.pipeline import PipelineRunner, StageWorker, StepTiming
from kunserve.runtime.regroup import MergeOrder, MergeStats, SplitOrder, merge_into_group, split_group
from kunserve.runtime.transport import PendingSends, recv_object, send_object
from kunserve.runtime.weight_restore import begin_pull
from kunserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@attrs.frozen
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None


@attrs.frozen
class StepCommand:
    new: tuple[NewRequest, ...] = ()
    aborts: tuple[str, ...] = ()
    merge: MergeOrder | None = None  # this rank joins a pipeline group in this step
    split: SplitOrder | None = None  # this rank's group splits back into single instances
    shutdown: bool = False
    migration: MigrationCommand | None = None  # llumnix: this step's live-migration work (runtime/migration.py)


@attrs.frozen
class StepReport:
    outputs: tuple[RequestOutput, ...]
    snapshot: InstanceSnapshot | None  # None from pipeline members that are not leaders
    error: str | None = None
    merge: MergeStats | None = None  # stats of a merge or split this rank just ran
    assignment: dict[str, int] | None = None  # after a split: request id -> rank that owns it
    exchange: ExchangeProgress | None = None  # this rank's share of a running KV exchange
    pipeline: tuple[StepTiming, ...] = ()  # a pipeline leader's step timings (bubble measurement)
    restore_bytes: int = 0  # weights this rank sent to a peer in this step's restore round
    migration: MigrationReport | None = None  # llumnix: migration candidates and outcomes


@attrs.define
class RankState:
    """What a rank runs: an instance (a pipeline leader steps every step, ``always_step``) or,
    with ``stage`` set, a non-leading pipeline stage."""

    engine: LLMEngine
    rank: int
    instance_id: int
    stage: StageWorker | None = None
    always_step: bool = False
    migrations: RankMigrations = attrs.Factory(RankMigrations)  # llumnix: migrations in flight here
    deferred_step: bool = False  # an overlapped stage answered rank 0 and runs its step next
    stage_error: str | None = None  # a deferred step's failure, for the next report


def handle_command(state: RankState, command: StepCommand, group) -> StepReport:
    """One rank's part of a cluster step; an exception aborts this instance's requests
    instead of hanging them."""
    engine, outputs = state.engine, []
    try:
        if state.stage is None:  # stage members have no requests of their own
            for r in command.new:
                engine.add_request(r.prompt_token_ids, r.params, r.request_id, r.arrival_time)
            outputs += [o for o in map(engine.abort_request, command.aborts) if o is not None]
        if command.split is not None or command.merge is not None or command.shutdown:
            outputs += _drain(state)  # a pipeline's steps in flight finish before it changes
        if command.split is not None and command.split.phase == "pull":
            return _begin_pull(state, command.split, group, outputs)
        if command.split is not None:
            return attrs.evolve(_split(state, command.split, group), outputs=tuple(outputs))
        if command.merge is not None:  # singles, leaders and stage members alike
            return _merge(state, command.merge, group, outputs)
        if state.stage is not None:
            report = StepReport((), None, state.stage_error, **_exchange_progress(state.stage.exchange),
                                **_restore_progress(state.stage))
            state.stage_error = None
            if command.shutdown:
                return report
            if state.stage.overlap:  # answer first: rank 0 goes on while this stage computes
                state.deferred_step = True
                return report
            state.stage.step()
            return StepReport((), None, **_exchange_progress(state.stage.exchange), **_restore_progress(state.stage))
        migration = run_migrations(state, command.migration, group)  # llumnix: copy KV before the step
        if command.shutdown:
            outputs += [engine.abort_request(rid) for rid in list(engine.requests)]
        elif state.always_step or engine.has_unfinished_requests():
            outputs += engine.step()
        return StepReport(tuple(outputs), engine.snapshot(state.instance_id), migration=migration,
                          **_leader_reports(engine.runner))
    except Exception:  # noqa: BLE001 - reported to rank 0, which fails the affected requests
        error = traceback.format_exc()
        log.error("instance %d step failed:\n%s", state.instance_id, error)
        outputs += [engine.abort_request(rid) for rid in list(engine.requests)]
        return StepReport(tuple(outputs), engine.snapshot(state.instance_id), error)


def _drain(state: RankState) -> list[RequestOutput]:
    """Finish an overlapped pipeline's steps in flight: the leader takes their results, a stage
    waits until its sends were taken. No-op elsewhere."""
    if state.stage is not None:
        state.stage.flush()
        return []
    return state.engine.drain()


def run_deferred_step(state: RankState) -> None:
    """An overlapped stage's step, run after its report went to rank 0. A failure is logged and
    rides on the next report (the leader's requests fail with the leader's own error)."""
    if not state.deferred_step:
        return
    state.deferred_step = False
    try:
        state.stage.step()
    except Exception:  # noqa: BLE001 - reported with the next step
        state.stage_error = traceback.format_exc()
        log.error("pipeline stage on rank %d failed:\n%s", state.rank, state.stage_error)


def _leader_reports(runner) -> dict:
    """StepReport fields a pipeline leader adds: its exchange progress and step timings."""
    if not isinstance(runner, PipelineRunner):
        return {}
    return _exchange_progress(runner.exchange) | _restore_progress(runner) | {"pipeline": tuple(runner.take_timings())}


def _restore_progress(runner) -> dict:
    """Weight bytes this rank sent in this step's restore round (none outside a restore)."""
    sent = 0 if runner.restore is None else runner.restore.take_bytes_sent()
    return {"restore_bytes": sent} if sent else {}


def _exchange_progress(exchange) -> dict:
    """StepReport fields for this step's share of a KV exchange (none outside one)."""
    progress = None if exchange is None else exchange.take_progress()
    return {} if progress is None or progress == ExchangeProgress() else {"exchange": progress}


def _merge(state: RankState, order: MergeOrder, group, outputs: list) -> StepReport:
    state.stage, stats = merge_into_group(state.engine, order, state.rank, group)
    state.always_step = state.stage is None
    state.instance_id = order.ranks[0]
    snapshot = state.engine.snapshot(state.instance_id) if state.stage is None else None
    return StepReport(tuple(outputs), snapshot, merge=stats)


def _begin_pull(state: RankState, order: SplitOrder, group, outputs: list) -> StepReport:
    """The restore's first phase starts: weights come back in rounds while the group serves."""
    engine = state.engine
    runner = state.stage if state.stage is not None else engine.runner
    runner.restore = begin_pull(engine, order.ranks, order.slices, state.rank, group)
    snapshot = engine.snapshot(state.instance_id) if state.stage is None else None
    return StepReport(tuple(outputs), snapshot)


def _split(state: RankState, order: SplitOrder, group) -> StepReport:
    runner = state.stage if state.stage is not None else state.engine.runner
    assignment, stats = split_group(state.engine, order, state.rank, group, runner.restore.received)
    state.stage, state.always_step, state.instance_id = None, False, state.rank
    return StepReport((), state.engine.snapshot(state.instance_id), merge=stats, assignment=assignment)


def run_rank(state: RankState, group) -> None:
    """A rank >= 1: serve rank 0's commands until it says shut down (or its connection drops)."""
    while True:
        command: StepCommand = recv_object(0, group)
        report = handle_command(state, command, group)
        if state.deferred_step:  # the report goes without waiting: rank 0 takes it after its own step,
            sent = PendingSends()  # which may wait on this stage (a KV exchange round)
            sent.send_object(report, 0, group)
            run_deferred_step(state)
            sent.wait()
        else:
            send_object(report, 0, group)
        if command.shutdown:
            return


@attrs.define
class PipelineTime:
    """Pipeline bubbles, from the leaders' step timings: per rank, the wall seconds of its
    groups' steps and the seconds it computed; the rest it sat idle."""

    wall: dict[int, float] = attrs.Factory(dict)
    busy: dict[int, float] = attrs.Factory(dict)
    steps: int = 0

    def record(self, timing: StepTiming) -> None:
        self.steps += 1
        for rank, seconds in timing.busy.items():
            self.wall[rank] = self.wall.get(rank, 0.0) + timing.wall
            self.busy[rank] = self.busy.get(rank, 0.0) + seconds

    def metrics(self) -> dict:
        if not self.steps:
            return {}
        idle = {str(r): max(0.0, 1 - self.busy[r] / self.wall[r]) for r in sorted(self.wall) if self.wall[r] > 0}
        total_wall = sum(self.wall.values())
        return {"pipeline_steps_total": self.steps, "pipeline_idle_fraction": idle,
                "pipeline_bubble_fraction": max(0.0, 1 - sum(self.busy.values()) / total_wall) if total_wall else 0.0}


class ClusterDriver:
    """Rank 0's view and control of every instance.

    ``migration`` (set by serve for ``--policy llumnix``) plans and tracks live migrations.

    Invariants: ``owner`` maps every unfinished request id to its instance; a request id leaves
    ``owner`` exactly when its finished output is returned from ``step``.
    """

    migration: MigrationCoordinator | None = None

    def __init__(self, local_engine: LLMEngine, world_size: int = 1, group=None, pipeline_size: int = 1,
                 drop: DropController | None = None):
        if world_size % pipeline_size:
            raise ValueError(f"world size {world_size} is not a multiple of pipeline size {pipeline_size}")
        self.local = local_engine
        self.world_size = world_size
        self.group = group
        # Instance i is the group led by rank i * pipeline_size; rank 0 leads instance 0.
        self.instance_rank = {i: i * pipeline_size for i in range(world_size // pipeline_size)}
        self.dispatcher = LoadBalancingDispatcher()
        self.snapshots = {i: local_engine.snapshot(i) for i in self.instance_rank}
        self.owner: dict[str, int] = {}
        self._new: dict[int, list[NewRequest]] = {i: [] for i in self.instance_rank if i}
        self._aborts: dict[int, list[str]] = {i: [] for i in self.instance_rank if i}
        self.failed_steps = 0
        self.pipeline_time = PipelineTime()
        self.local_state = RankState(local_engine, 0, 0, None, always_step=pipeline_size > 1)
        self.drop = drop
        self._merges: dict[int, MergeOrder | SplitOrder] = {}  # rank -> regrouping it runs next step

    # The engine-like surface --------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.local.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.local.max_model_len

    @property
    def model_config(self):
        return self.local.model_config

    def tokenize(self, prompt):
        return self.local.tokenize(prompt)

    def validate_prompt(self, token_ids):
        self.local.validate_prompt(token_ids)

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(tuple(self.snapshots[i] for i in sorted(self.snapshots)))

    def add_request(self, prompt, params=None, request_id=None, arrival_time=None) -> str:
        params = params or SamplingParams()
        if request_id is None or request_id in self.owner:
            raise ValueError(f"request id {request_id!r} is missing or already in use")
        token_ids = self.local.tokenize(prompt)
        self.local.validate_prompt(token_ids)
        block_size = self.local.block_manager.block_size
        instance = self.dispatcher.choose(self.snapshot(), -(-len(token_ids) // block_size))
        if instance == 0:
            self.local.add_request(token_ids, params, request_id, arrival_time)
        else:
            self._new[instance].append(NewRequest(request_id, token_ids, params, arrival_time))
        self.owner[request_id] = instance
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        instance = self.owner.get(request_id)
        if instance == 0:
            del self.owner[request_id]
            return self.local.abort_request(request_id)
        if instance is not None:
            self._aborts[instance].append(request_id)  # its output arrives with the next report
        return None

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner)

    def has_background_work(self) -> bool:
        """Steps are needed without requests: a regrouping is ordered, or a drop group exists
        (it moves KV or weights in rounds, and is restored once the hold time has passed)."""
        return bool(self._merges) or (self.drop is not None and bool(self.drop.groups))

    def extra_metrics(self) -> dict:
        """Cluster-level counters for /metrics (the drop mechanism adds drops and restores)."""
        extra = {"cluster_instances": len(self.snapshots), "failed_steps_total": self.failed_steps}
        extra |= self.migration.metrics() if self.migration else {}
        extra |= self.pipeline_time.metrics()
        return extra | (self.drop.metrics() if self.drop else {})

    def step(self) -> list[RequestOutput]:
        merges, self._merges = self._merges, {}
        commands = self._take_commands(merges)
        local = _regroup_command(StepCommand(), merges.get(0))
        if self.migration is not None:  # llumnix: this step's migration tasks ride on the commands
            commands, local = self.migration.attach(commands, local, self.instance_rank)
        # Sent without waiting: an overlapped pipeline stage takes its command only after it
        # finished the previous step, and rank 0 computes its own stage meanwhile.
        sent = PendingSends()
        for rank, command in commands.items():
            sent.send_object(command, rank, self.group)
        reports = [handle_command(self.local_state, local, self.group)]
        run_deferred_step(self.local_state)
        reports += [recv_object(rank, self.group) for rank in commands]
        sent.wait()  # every rank answered, so it has its command
        outputs = [o for report in reports for o in self._absorb(report)]
        if self.migration is not None:  # before finished requests leave owner: it re-points migrated ones
            self.migration.after_step(self, reports)
        if self.drop is not None:
            self.drop.record_exchange([r.exchange for r in reports if r.exchange is not None])
            self.drop.record_split(sum(r.restore_bytes for r in reports), 0.0)
        for timing in (t for r in reports for t in r.pipeline):
            self.pipeline_time.record(timing)
        if merges:
            self._apply_merges({o for o in merges.values() if isinstance(o, MergeOrder)}, reports)
            self._apply_splits({o for o in merges.values() if isinstance(o, SplitOrder) and o.phase == "split"}, reports)
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        if self.drop is not None:
            orders = self.drop.plan(self.snapshot()) + self.drop.plan_restore(self.snapshot())
            self._merges = {rank: order for order in orders for rank in order.ranks}
        return outputs

    def _apply_splits(self, orders: set[SplitOrder], reports: list[StepReport]) -> None:
        """Every member of a split group serves alone again; requests follow the assignment."""
        for order in orders:
            for member in order.ranks:
                self.instance_rank[member] = member
                self._new.setdefault(member, [])
                self._aborts.setdefault(member, [])
            self.drop.restored(order)
        for report in reports:
            if report.assignment is not None:
                self.owner.update({rid: rank for rid, rank in report.assignment.items() if rid in self.owner})
            if report.merge is not None and report.assignment is not None:
                self.drop.record_split(report.merge.bytes_sent, report.merge.seconds)

    def _apply_merges(self, orders: set[MergeOrder], reports: list[StepReport]) -> None:
        """The members of each merged group now serve as one instance, led by its first rank."""
        for order in orders:
            leader = order.ranks[0]
            for member in order.ranks[1:]:
                self.instance_rank.pop(member, None)
                self.snapshots.pop(member, None)
                self.dispatcher.observe(member)
                # add_request never runs inside step(), and _take_commands emptied these queues
                assert not self._new.pop(member, None) and not self._aborts.pop(member, None)
                for request_id, instance in self.owner.items():
                    if instance == member:
                        self.owner[request_id] = leader
            self.drop.merged()
        for report in reports:
            if report.merge is not None and report.assignment is None:
                self.drop.record_merge(report.merge.seconds)

    def shutdown(self) -> list[RequestOutput]:
        """Abort everything in flight and release the workers; returns the abort outputs."""
        outputs = _drain(self.local_state)  # rank 0's own pipeline steps in flight (members wait on them)
        outputs += [self.local.abort_request(rid) for rid in list(self.local.requests)]
        outputs = [o for o in outputs if o is not None]
        for rank in range(1, self.world_size):
            send_object(StepCommand(shutdown=True), rank, self.group)
        for rank in range(1, self.world_size):
            outputs += self._collect(rank)
        self.owner.clear()
        return outputs

    # Internals ----------------------------------------------------------------------------
    def _take_commands(self, merges: dict) -> dict[int, StepCommand]:
        """One command per rank >= 1; pipeline members that are not leaders get empty ones."""
        commands = {rank: _regroup_command(StepCommand(), merges.get(rank)) for rank in range(1, self.world_size)}
        for instance, rank in self.instance_rank.items():
            if instance:
                command = StepCommand(tuple(self._new[instance]), tuple(self._aborts[instance]))
                commands[rank] = _regroup_command(command, merges.get(rank))
                self._new[instance].clear()
                self._aborts[instance].clear()
        return commands

    def _collect(self, rank: int) -> list[RequestOutput]:
        return self._absorb(recv_object(rank, self.group))

    def _absorb(self, report: StepReport) -> list[RequestOutput]:
        if report.error is not None:
            self.failed_steps += 1
        if report.snapshot is not None:
            self._record(report.snapshot.instance_id, report.snapshot)
        return list(report.outputs)

    def _record(self, instance_id: int, snapshot: InstanceSnapshot) -> None:
        self.snapshots[instance_id] = snapshot
        self.dispatcher.observe(instance_id)


def _regroup_command(command: StepCommand, order: MergeOrder | SplitOrder | None) -> StepCommand:
    if isinstance(order, MergeOrder):
        return attrs.evolve(command, merge=order)
    if isinstance(order, SplitOrder):
        return attrs.evolve(command, split=order)
    return command
