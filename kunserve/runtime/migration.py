"""Live migration of running requests between data-parallel instances (``--policy llumnix``).

The decision is ``kunserve/policy/migration.py``; this module moves the KV and the request.
A migration runs over consecutive cluster steps while the request keeps decoding at its source:

1. **start** (rank 0 planned it after the last step): the destination allocates blocks for the
   request's computed tokens under the request's own id (the id is not in its scheduler, so
   nothing else touches them); if it cannot, the migration is aborted and the request stays.
2. **copy stages**, one per step: the source sends the blocks completed since the last stage
   (full blocks of computed tokens never change again), the destination grows its allocation
   as the request grows and writes them into its own block ids.
3. **stop-and-copy**, when at most ``final_blocks`` blocks are uncopied: the source leaves the
   request out of this step, sends the rest (the partial last block included) and the
   ``Request`` (tokens, counts, metrics, seeded generator state), frees its blocks and forgets
   it; the destination puts it at the tail of its running list (the newest, its next preemption
   victim) and decodes it in this very step, so the request loses no step at all.

A request that finishes, is aborted or preempted at the source, or a destination that cannot
grow its allocation, cancels the migration on both sides: the destination frees its blocks.

Wire protocol, per migration per step (both ranks learn of it from rank 0's ``StepCommand``,
before their engine step): source → destination ``StageHeader`` (gloo), destination → source
``(accepted, reason)`` (gloo), then, if accepted and non-empty, the blocks as one tensor on the
default group (NCCL on GPUs). An instance takes part in at most one migration at a time (the
planner guarantees it), so two ranks never block sending to each other.
"""

from __future__ import annotations

import logging
import time

import attrs
import torch
import torch.distributed as dist

from kunserve.policy.migration import MigrationCandidate, MigrationOrder, MigrationPlanner
from kunserve.runtime.request import Request, RequestStatus
from kunserve.runtime.transport import recv_object, send_object

log = logging.getLogger(__name__)

COPY, FINAL, CANCEL = "copy", "final", "cancel"
COMPLETED, ABORTED = "completed", "aborted"


# -- messages -----------------------------------------------------------------------------------

@attrs.frozen
class MigrationTask:
    """This step's work on one migration, sent to both of its ranks (the ranks leading the
    order's source and destination instances). ``start``: the first step of the migration."""

    order: MigrationOrder
    src_rank: int
    dst_rank: int
    start: bool


@attrs.frozen
class MigrationCommand:
    """Rides on a leader's ``StepCommand`` every step under llumnix (empty: only report)."""

    tasks: tuple[MigrationTask, ...] = ()


@attrs.frozen
class MigrationEvent:
    """A migration ended on the source side (the source's word is what rank 0 counts)."""

    request_id: str
    outcome: str  # COMPLETED or ABORTED
    reason: str = ""
    bytes_sent: int = 0
    stages: int = 0


@attrs.frozen
class MigrationReport:
    candidates: tuple[MigrationCandidate, ...]
    events: tuple[MigrationEvent, ...] = ()


@attrs.frozen
class StageHeader:
    """Blocks ``[first_block, last_block)`` of the request's table follow as one tensor
    ``[last - first, layers, 2, block_size, kv_heads, head_dim]``; the destination's table must
    hold ``alloc_tokens`` tokens. ``request`` and ``text_len`` only with FINAL."""

    request_id: str
    kind: str
    alloc_tokens: int = 0
    first_block: int = 0
    last_block: int = 0
    request: Request | None = None
    text_len: int = 0
    reason: str = ""


# -- per-rank state -----------------------------------------------------------------------------

@attrs.define
class Outgoing:
    """Invariant: blocks ``[0, sent_blocks)`` of the request's table are on the destination and
    hold only computed tokens of full blocks (except after the final stage)."""

    order: MigrationOrder
    preemptions_at_start: int
    sent_blocks: int = 0
    bytes_sent: int = 0
    stages: int = 0


@attrs.define
class RankMigrations:
    """A rank's migrations in flight: outgoing ones by request id, incoming ones as a set (their
    blocks sit in the block manager under the request id until the request arrives)."""

    outgoing: dict[str, Outgoing] = attrs.Factory(dict)
    incoming: set[str] = attrs.Factory(set)
    final_blocks: int = 1  # stop-and-copy once at most this many blocks are uncopied


def run_migrations(state, command: MigrationCommand | None, group) -> MigrationReport | None:
    """A leader's migration work for this step, before its engine step (``handle_command``)."""
    if command is None:
        return None
    engine, local = state.engine, state.migrations
    events = []
    for task in command.tasks:
        if state.rank == task.src_rank:
            event = _source_stage(engine, local, task, group)
            if event is not None:
                events.append(event)
        else:
            _destination_stage(engine, local, task, group)
    return MigrationReport(candidates_of(engine, local), tuple(events))


def candidates_of(engine, local: RankMigrations) -> tuple[MigrationCandidate, ...]:
    """Running requests past their prefill, in admission order, not already migrating."""
    bm, out = engine.block_manager, []
    for r in engine.scheduler.running:
        if r.num_uncomputed_tokens == 1 and r.request_id not in local.outgoing:
            out.append(MigrationCandidate(r.request_id, len(bm.block_table(r.request_id)),
                                          r.max_total_tokens - r.num_tokens))
    return tuple(out)


# -- source side --------------------------------------------------------------------------------

def _source_stage(engine, local: RankMigrations, task: MigrationTask, group) -> MigrationEvent | None:
    rid, dst = task.order.request_id, task.dst_rank
    request = engine.requests.get(rid)
    if task.start and request is not None:
        local.outgoing[rid] = Outgoing(task.order, request.metrics.num_preemptions)
    out = local.outgoing.get(rid)
    reason = _why_cancel(request, out)
    if reason is not None:
        return _cancel_at_source(local, rid, dst, reason, out, group)
    bs = engine.block_manager.block_size
    computed = request.num_computed_tokens
    total, full = -(-computed // bs), computed // bs
    final = total - out.sent_blocks <= local.final_blocks
    header = StageHeader(rid, FINAL if final else COPY, computed, out.sent_blocks, total if final else full,
                         request if final else None, engine.stop_search_offset(rid))
    send_object(header, dst, group)
    accepted, why = recv_object(dst, group)
    if not accepted:
        local.outgoing.pop(rid)
        log.warning("migration of %s to rank %d aborted: %s", rid, dst, why)
        return MigrationEvent(rid, ABORTED, why, out.bytes_sent, out.stages)
    out.bytes_sent += _send_blocks(engine, rid, header, dst)
    out.sent_blocks, out.stages = header.last_block, out.stages + 1
    if not final:
        return None
    _forget(engine, request)
    local.outgoing.pop(rid)
    return MigrationEvent(rid, COMPLETED, "", out.bytes_sent, out.stages)


def _why_cancel(request: Request | None, out: Outgoing | None) -> str | None:
    if request is None or request.status.finished:
        return "the request finished or was aborted at the source"
    if out is None:
        return "the source lost the migration (its step failed)"
    if request.status is not RequestStatus.RUNNING or request.metrics.num_preemptions != out.preemptions_at_start:
        return "the request was preempted at the source"
    return None


def _cancel_at_source(local: RankMigrations, rid: str, dst: int, reason: str, out, group) -> MigrationEvent:
    local.outgoing.pop(rid, None)
    send_object(StageHeader(rid, CANCEL, reason=reason), dst, group)
    recv_object(dst, group)  # the destination freed its blocks
    log.info("migration of %s to rank %d cancelled: %s", rid, dst, reason)
    return MigrationEvent(rid, ABORTED, reason, out.bytes_sent if out else 0, out.stages if out else 0)


def _send_blocks(engine, rid: str, header: StageHeader, dst: int) -> int:
    if header.last_block == header.first_block:
        return 0
    storage = engine.kv_cache.storage
    table = engine.block_manager.block_table(rid)[header.first_block:header.last_block]
    data = storage[torch.tensor(table, device=storage.device)].contiguous()  # [n, layers, 2, bs, kv_heads, hd]
    dist.send(data, dst)  # default group: NCCL on GPUs
    return data.numel() * data.element_size()


def _forget(engine, request: Request) -> None:
    """The request now lives at the destination: free its blocks here and drop every trace."""
    engine.scheduler.running.remove(request)
    engine.block_manager.free(request.request_id)
    engine.forget_request(request.request_id)


# -- destination side ---------------------------------------------------------------------------

def _destination_stage(engine, local: RankMigrations, task: MigrationTask, group) -> None:
    rid, src = task.order.request_id, task.src_rank
    header: StageHeader = recv_object(src, group)
    if header.kind == CANCEL:
        _drop_incoming(engine, local, rid)
        send_object((True, ""), src, group)
        return
    if task.start and rid not in engine.requests and not engine.block_manager.block_table(rid):
        local.incoming.add(rid)  # from now on the blocks under ``rid`` here are this migration's
    reason = _why_refuse(engine, local, header)
    if reason is not None:
        _drop_incoming(engine, local, rid)
        send_object((False, reason), src, group)
        log.warning("refused migration of %s from rank %d: %s", rid, src, reason)
        return
    engine.block_manager.allocate(rid, header.alloc_tokens)
    send_object((True, ""), src, group)
    _recv_blocks(engine, rid, header, src)
    if header.kind == FINAL:
        _install(engine, local, header)


def _why_refuse(engine, local: RankMigrations, header: StageHeader) -> str | None:
    rid, bm = header.request_id, engine.block_manager
    if rid not in local.incoming:
        return f"request {rid} is already here or not an incoming migration"
    if not bm.can_allocate(rid, header.alloc_tokens):
        return (f"the destination cannot allocate {bm.blocks_needed(rid, header.alloc_tokens)} more "
                f"blocks ({bm.num_free_blocks} free)")
    if header.kind == FINAL and len(engine.scheduler.running) >= engine.scheduler.max_num_seqs:
        return "the destination runs max_num_seqs requests"
    return None


def _drop_incoming(engine, local: RankMigrations, rid: str) -> None:
    if rid in local.incoming:
        local.incoming.discard(rid)
        engine.block_manager.free(rid)


def _recv_blocks(engine, rid: str, header: StageHeader, src: int) -> None:
    count = header.last_block - header.first_block
    if count == 0:
        return
    storage = engine.kv_cache.storage
    buffer = torch.empty((count, *storage.shape[1:]), dtype=storage.dtype, device=storage.device)
    dist.recv(buffer, src)
    table = engine.block_manager.block_table(rid)[header.first_block:header.last_block]
    storage[torch.tensor(table, device=storage.device)] = buffer


def _install(engine, local: RankMigrations, header: StageHeader) -> None:
    """The request joins this instance's running list with its KV in place (the block table
    already holds ``num_computed_tokens``); it is stepped from this step on."""
    request = header.request
    assert request.status is RequestStatus.RUNNING
    assert len(engine.block_manager.block_table(request.request_id)) == -(-request.num_computed_tokens
                                                                         // engine.block_manager.block_size)
    local.incoming.discard(request.request_id)
    engine.scheduler.running.append(request)
    engine.adopt_request(request, header.text_len)


# -- rank 0: planning and bookkeeping -------------------------------------------------------------

class MigrationCoordinator:
    """Rank 0's side: turns the planner's orders into per-step tasks and their outcomes into
    ``ClusterDriver.owner`` updates and counters.

    Invariants: ``inflight`` holds every migration whose source has not reported an outcome;
    each instance appears in at most one of them; a request id in ``moved`` never migrates
    again (pruned once it leaves ``owner``).
    """

    def __init__(self, planner: MigrationPlanner | None = None):
        self.planner = planner or MigrationPlanner()
        self.inflight: dict[str, MigrationOrder] = {}
        self._starting: set[str] = set()
        self.candidates: dict[int, tuple[MigrationCandidate, ...]] = {}
        self.moved: set[str] = set()
        self.started = self.completed = self.aborted = self.bytes_sent = 0
        self._started_at: dict[str, float] = {}  # request id -> when planned, for the log

    def attach(self, commands: dict, local, instance_rank: dict[int, int]):
        """Give every leader (rank 0's ``local`` command included) its ``MigrationCommand``."""
        tasks: dict[int, list[MigrationTask]] = {rank: [] for rank in instance_rank.values()}
        for rid, order in self.inflight.items():
            src, dst = instance_rank[order.src], instance_rank[order.dst]
            task = MigrationTask(order, src, dst, rid in self._starting)
            tasks[src].append(task)
            tasks[dst].append(task)
        self._starting.clear()
        assert all(len(t) <= 1 for t in tasks.values()), "an instance is in two migrations"
        commands = {rank: attrs.evolve(c, migration=MigrationCommand(tuple(tasks[rank]))) if rank in tasks else c
                    for rank, c in commands.items()}
        return commands, attrs.evolve(local, migration=MigrationCommand(tuple(tasks[0])))

    def after_step(self, driver, reports) -> None:
        """Absorb this step's migration reports, then plan the next migrations."""
        for report in reports:
            if report.migration is None or report.snapshot is None:
                continue
            self.candidates[report.snapshot.instance_id] = report.migration.candidates
            for event in report.migration.events:
                self._finish(driver, event)
        self.moved = {rid for rid in self.moved if rid in driver.owner}
        busy = frozenset(i for o in self.inflight.values() for i in (o.src, o.dst))
        exclude = frozenset(self.moved | self.inflight.keys())
        for order in self.planner.plan(driver.snapshot(), self.candidates, busy, exclude, len(self.inflight)):
            self.inflight[order.request_id] = order
            self._starting.add(order.request_id)
            self._started_at[order.request_id] = time.monotonic()
            self.started += 1
            log.info("migrate: request %s (%d blocks) from instance %d to %d", order.request_id,
                     order.num_blocks, order.src, order.dst)

    def _finish(self, driver, event: MigrationEvent) -> None:
        order = self.inflight.pop(event.request_id, None)
        if order is None:
            return
        self.bytes_sent += event.bytes_sent
        took = time.monotonic() - self._started_at.pop(event.request_id, time.monotonic())
        if event.outcome == COMPLETED:
            self.completed += 1
            self.moved.add(event.request_id)
            if event.request_id in driver.owner:  # finished requests leave owner after this
                driver.owner[event.request_id] = order.dst
            log.info("migrated request %s from instance %d to %d: %d stages, %d bytes, %.3f s",
                     event.request_id, order.src, order.dst, event.stages, event.bytes_sent, took)
        else:
            self.aborted += 1
            log.info("migration of request %s from instance %d to %d aborted: %s", event.request_id,
                     order.src, order.dst, event.reason)

    def metrics(self) -> dict:
        return {"migrations_started_total": self.started, "migrations_completed_total": self.completed,
                "migrations_aborted_total": self.aborted, "migration_bytes_total": self.bytes_sent,
                "migrations_inflight": len(self.inflight)}
