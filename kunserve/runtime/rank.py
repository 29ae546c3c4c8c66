"""One rank's side of a cluster step (ranks >= 1 in ``run_rank``, rank 0's own instance through
``ClusterDriver``): apply rank 0's ``StepCommand`` (new requests, aborts, a merge / pull / split
order, a migration), step this rank's instance or pipeline stage, answer with a ``StepReport``.
An overlapped pipeline stage answers first and computes after (``RankState.deferred_step``)."""

from __future__ import annotations

import logging
import traceback

import attrs

from kunserve.outputs import RequestOutput
from kunserve.policy.snapshot import InstanceSnapshot
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.kv_exchange import ExchangeProgress
from kunserve.runtime.migration import MigrationCommand, MigrationReport, RankMigrations, run_migrations
from kunserve.runtime.pipeline import PipelineRunner, StageWorker
from kunserve.runtime.pipeline_step import StepTiming
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
            outputs += drain_rank(state)  # a pipeline's steps in flight finish before it changes
        if command.split is not None and command.split.phase == "pull":
            return _begin_pull(state, command.split, group, outputs)
        if command.split is not None:
            return attrs.evolve(_split(state, command.split, group), outputs=tuple(outputs))
        if command.merge is not None:  # singles, leaders and stage members alike
            return _merge(state, command.merge, group, outputs)
        if state.stage is not None:
            if state.stage.overlap and not command.shutdown:
                state.deferred_step = True  # answer first: rank 0 goes on while this stage computes
            elif not command.shutdown:
                state.stage.step()
            return _stage_report(state)
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


def _stage_report(state: RankState) -> StepReport:
    """A stage member's report: its exchange / restore progress so far and the failure of a
    deferred step, if one failed (overlapped: this is the previous step's)."""
    error, state.stage_error = state.stage_error, None
    return StepReport((), None, error, **_exchange_progress(state.stage.exchange), **_restore_progress(state.stage))


def drain_rank(state: RankState) -> list[RequestOutput]:
    """Finish an overlapped pipeline's steps in flight: the leader takes their results, a stage
    waits until its sends were taken. No-op elsewhere."""
    if state.stage is not None:
        run_deferred_step(state)  # rank 0 runs its stage's step at the start of the next cluster step
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
