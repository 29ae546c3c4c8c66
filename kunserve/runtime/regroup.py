"""Executing a drop: instances or groups merge into one pipeline group (see docs/design-drop.md).

Every member of a ``MergeOrder`` runs ``merge_into_group`` in the same cluster step:

1. the leader of each source group tells its members which requests are live (a member may
   still hold blocks of requests that finished in the last step);
2. each member re-slices its model to its new stage's layers and drops the other layers'
   weights into its KV cache (VMM: the chunks move, no copy);
3. it re-views the KV cache with the new block shape. Block-major layout makes an old block of
   ``L`` layers exactly ``L / l`` new blocks of ``l`` layers, so a running request's KV for the
   kept layers stays where it is (old block ``b`` -> new block ``b * L / l + k``) and the KV of
   the peers' layers sits in the other new blocks, registered as *outbound* tables;
4. the source leaders hand their requests to the new leader; running ones become *stalled*;
5. the new leader turns every member's outbound pages into an ``ExchangeSchedule`` and sends it
   round.

The merge step itself moves no KV: the exchange then runs one round after each pipeline step
(``kv_exchange``), stalled requests resume as their KV completes, and queued requests are
admitted at once into the memory the schedule guarantees free. Requests on other instances keep
running throughout. A merge whose slices cannot keep KV in place (``MergeOrder.aligned`` false)
preempts the running requests instead, which the group recomputes.

Restore is the reverse in two phases (``SplitOrder.phase``): ``pull`` brings the dropped
weights back in rounds while the group serves (``weight_restore``), ``split`` moves the running
requests' KV to their new owners and rebuilds each member's whole model (``split_group``).
"""

from __future__ import annotations

import logging
import time

import attrs
import torch
import torch.distributed as dist

from kunserve.policy.drop import Group
from kunserve.policy.exchange import (PageTransfer, ResidentRequest, assign_owners, plan_exchange,
                                      schedule_exchange)
from kunserve.runtime.kv_exchange import KVExchange, LeaderExchange, outbound_owner
from kunserve.runtime.pipeline import GroupLayout, PipelineRunner, StageWorker
from kunserve.runtime.transport import activation_group, recv_object, send_object

log = logging.getLogger(__name__)

LayerRange = tuple[int, int]
DEFAULT_EXCHANGE_CHUNK_BYTES = 32 << 20


@attrs.frozen
class MergeOrder:
    """Ranks in pipeline order with their layer slices; the first rank leads the group.
    ``sources`` are the groups that merge (default: every rank a single instance);
    ``chunk_bytes`` bounds what one link carries per exchange round (about the link bandwidth
    times one stage's compute time); ``micro_batcher`` is how the group's leader splits steps."""

    ranks: tuple[int, ...]
    slices: tuple[LayerRange, ...]
    sources: tuple[Group, ...] = ()
    chunk_bytes: int = DEFAULT_EXCHANGE_CHUNK_BYTES
    micro_batcher: object = None  # the group's micro-batch policy (policy/batching.py); None: one per step
    overlap: bool = True  # the group keeps steps in flight (runtime/pipeline.py); False: lockstep

    def slice_of(self, rank: int) -> LayerRange:
        return self.slices[self.ranks.index(rank)]

    @property
    def source_groups(self) -> tuple[Group, ...]:
        num_layers = self.slices[-1][1]
        return self.sources or tuple(Group.single(r, num_layers) for r in self.ranks)

    def source_of(self, rank: int) -> Group:
        return next(g for g in self.source_groups if rank in g.members)

    @property
    def aligned(self) -> bool:
        """Every new slice has one length and sits at a multiple of it inside what its member
        held: the old blocks split evenly into new ones, so KV can stay in place."""
        if len({b - a for a, b in self.slices}) != 1:
            return False
        for g in self.source_groups:
            for member, (old_first, old_last) in zip(g.members, g.slices):
                first, last = self.slice_of(member)
                width = last - first
                if not (old_first <= first and last <= old_last and (old_last - old_first) % width == 0
                        and (first - old_first) % width == 0):
                    return False
        return True


@attrs.frozen
class MergeStats:
    bytes_sent: int
    seconds: float


@attrs.frozen
class _Manifest:
    """A member's state after its re-layout, for the leader's exchange schedule."""

    pool: int  # KV pages in all
    held: int  # pages of the exchanged requests (kept + outbound)
    transfers: tuple[PageTransfer, ...]


def reslice_model(model, first: int, last: int) -> list:
    """Remove the modules outside ``[first, last)``; returns the weight units that left."""
    gone = [i for i in model.layer_ids if not first <= i < last]
    for layer_id in gone:
        del model.model.layers[str(layer_id)]
    if first > 0 and model.model.embed_tokens is not None:
        model.model.embed_tokens = None
        gone.append("embed")
    if last < model.config.num_layers and model.lm_head is not None:
        model.model.norm, model.lm_head = None, None
        gone.append("head")
    model.layer_range = (first, last)
    model.is_first, model.is_last = first == 0, last == model.config.num_layers
    return gone


def _live_requests(engine, order: MergeOrder, rank: int, group) -> dict[str, int]:
    """Step 1: ``{request_id: computed tokens}`` of the source group's running requests, which
    its leader holds; members drop blocks of anything else (finished in the last step)."""
    source = order.source_of(rank)
    if rank == source.members[0]:
        if not order.aligned:
            while engine.scheduler.preempt_newest():
                pass  # KV cannot stay in place: the group recomputes these requests
        # the group drained before this order ran, so nothing is in flight: the counts are final
        assert not any(r.num_in_flight_tokens for r in engine.scheduler.running), "merge before drain"
        live = {r.request_id: r.num_computed_tokens for r in engine.scheduler.running}
        for member in source.members[1:]:
            send_object(live, member, group)
        return live
    live = recv_object(source.members[0], group)
    for owner in engine.block_manager.owners:
        if owner not in live:
            engine.block_manager.free(owner)
    return live


def _relayout(engine, order: MergeOrder, rank: int, live: dict[str, int]) -> _Manifest:
    """Steps 2-3. Kept pages are adopted by their requests, the peers' pages by outbound
    tables; returns what the leader needs to schedule the exchange."""
    memory, bm = engine.memory, engine.block_manager
    old_first, old_last = engine.model.layer_range
    first, last = order.slice_of(rank)
    width = last - first  # layers per new block; every slice has this width (aligned merge)
    ratio = (old_last - old_first) // width
    residents = [ResidentRequest(rid, rank, tokens, tuple(bm.block_table(rid))) for rid, tokens in live.items()]
    plan = plan_exchange((Group((rank,), ((old_first, old_last),)),), Group(order.ranks, order.slices), residents)
    memory.executed_units -= set(reslice_model(engine.model, first, last))
    memory.drop_units(memory.placement_units() - memory.executed_units)
    memory.relayout(range(first, last))
    bm.reset(memory.kv_cache.num_blocks)

    def pages(transfer) -> list[int]:  # old block b, layers at offset k*width -> new block b*ratio + k
        return [b * ratio + (transfer.layers[0] - old_first) // width for b in transfer.src_pages]

    for kept in plan.kept:
        bm.adopt(kept.request_id, pages(kept))
    transfers = []
    for move in plan.transfers:
        bm.adopt(outbound_owner(move.dst, move.request_id), pages(move))
        transfers.append(PageTransfer(move.request_id, rank, move.dst, len(move.src_pages)))
    return _Manifest(bm.num_blocks, bm.num_blocks - bm.num_free_blocks, tuple(transfers))


def _gather_requests(engine, order: MergeOrder, rank: int, group) -> None:
    """Step 4: the source leaders' requests move to the new leader's scheduler (by arrival)."""
    scheduler, leader = engine.scheduler, order.ranks[0]
    source_leaders = [g.members[0] for g in order.source_groups]
    if rank != leader:
        if rank in source_leaders:
            send_object((list(scheduler.running), list(scheduler.waiting)), leader, group)
            scheduler.running.clear()
            scheduler.waiting.clear()
            engine.requests.clear()
        return
    for peer in source_leaders:
        if peer == leader:
            continue
        running, waiting = recv_object(peer, group)
        scheduler.running += running
        scheduler.waiting.extend(waiting)
        for request in running + waiting:
            engine.adopt_request(request)
    scheduler.running.sort(key=lambda r: r.metrics.arrival_time)
    ordered = sorted(scheduler.waiting, key=lambda r: r.metrics.arrival_time)
    scheduler.waiting.clear()
    scheduler.waiting.extend(ordered)


def _agree_on_schedule(engine, order: MergeOrder, rank: int, manifest: _Manifest, group):
    """Step 5: the leader schedules every member's transfers; returns (schedule, capacity)."""
    leader = order.ranks[0]
    if rank != leader:
        send_object(manifest, leader, group)
        return recv_object(leader, group)
    manifests = {leader: manifest} | {peer: recv_object(peer, group) for peer in order.ranks[1:]}
    arrival = {r.request_id: i for i, r in enumerate(engine.scheduler.running)}  # sorted by arrival
    transfers = sorted((t for m in manifests.values() for t in m.transfers),
                       key=lambda t: (arrival[t.request_id], t.src, t.dst))
    storage = engine.kv_cache.storage
    page_bytes = storage[0].numel() * storage.element_size()
    schedule = schedule_exchange(transfers, {r: m.held for r, m in manifests.items()},
                                 {r: m.pool for r, m in manifests.items()}, max(1, order.chunk_bytes // page_bytes))
    capacity = min(m.pool for m in manifests.values())
    for peer in order.ranks[1:]:
        send_object((schedule, capacity), peer, group)
    return schedule, capacity


def merge_into_group(engine, order: MergeOrder, rank: int, group):
    """Run this rank's part of a merge; returns (StageWorker or None for the leader, stats)."""
    start = time.perf_counter()
    live = _live_requests(engine, order, rank, group)
    manifest = _relayout(engine, order, rank, live)
    _gather_requests(engine, order, rank, group)
    schedule, capacity = _agree_on_schedule(engine, order, rank, manifest, group)
    layout = GroupLayout(order.ranks, group, activation_group())
    stats = MergeStats(0, time.perf_counter() - start)
    log.info("rank %d merged into group %s as stage %s: KV blocks %d (group %d), exchange of %d pages in %d "
             "rounds, %.3f s", rank, order.ranks, order.slice_of(rank), engine.block_manager.num_blocks, capacity,
             sum(p.num_pages for r in schedule.rounds for p in r), schedule.num_rounds, stats.seconds)
    if rank == order.ranks[0]:
        scheduler = engine.scheduler
        for request in scheduler.running:
            scheduler.stall(request)
        scheduler.running.clear()
        exchange = LeaderExchange(rank, schedule, engine.kv_cache, engine.block_manager, scheduler)
        engine.runner = PipelineRunner(engine.model, engine.kv_cache, engine.block_manager, scheduler,
                                       engine.device, rank, layout, engine.config.seed, exchange=exchange,
                                       batcher=order.micro_batcher, overlap=order.overlap)
        return None, stats
    exchange = KVExchange(rank, schedule, engine.kv_cache, engine.block_manager)
    return StageWorker(engine.model, engine.kv_cache, engine.block_manager, engine.device, rank, layout,
                       exchange=exchange, overlap=order.overlap), stats


# -- restore: the group splits back into single instances ---------------------------------------

@attrs.frozen
class SplitOrder:
    """Restore the group ``ranks`` (pipeline order, ``slices``) in two phases: ``pull`` (the
    dropped weights come back round by round while the group serves, ``weight_restore``), then
    ``split`` (KV gathered to each request's new owner; the members serve alone again)."""

    ranks: tuple[int, ...]
    slices: tuple[LayerRange, ...]
    phase: str = attrs.field(default="pull")

    @phase.validator
    def _check_phase(self, _attr, value):
        if value not in ("pull", "split"):
            raise ValueError(f"phase must be 'pull' or 'split', got {value!r}")


def split_group(engine, order: SplitOrder, rank: int, group, restored: dict[str, torch.Tensor]):
    """Run this rank's part of the ``split`` phase; returns (assignment request -> rank, stats).
    ``restored``: the weights this member pulled back in the ``pull`` phase, by name.

    1. the leader assigns every request to a member (running ones balanced by KV blocks);
    2. each member sends its layers' KV of every running request to the request's new owner;
    3. each member builds the whole model from its stage's and the restored tensors (all in
       their weight memory already) and writes the received KV into full-model blocks.
    """
    start = time.perf_counter()
    assert not engine.memory.unified.dropped, "the pull phase brings every dropped unit back first"
    assignment = _assign(engine, order, rank, group)
    pieces, sent = _gather_kv(engine, order, rank, assignment, group)
    _restore_full_model(engine, engine.model, restored)
    _resume_requests(engine, order, rank, assignment, pieces, group)
    stats = MergeStats(sent, time.perf_counter() - start)
    log.info("rank %d left group %s: %d KV blocks, %d requests, %d bytes sent, %.3f s", rank, order.ranks,
             engine.block_manager.num_blocks, len(engine.requests), stats.bytes_sent, stats.seconds)
    return assignment, stats


def _assign(engine, order: SplitOrder, rank: int, group) -> dict[str, int]:
    leader = order.ranks[0]
    if rank != leader:
        return recv_object(leader, group)
    bm = engine.block_manager
    assignment = assign_owners(engine.scheduler.running, engine.scheduler.waiting, order.ranks,
                               lambda rid: len(bm.block_table(rid)))
    for peer in order.ranks[1:]:
        send_object(assignment, peer, group)
    return assignment


def _pairs(ranks):
    """Ordered (sender, receiver) pairs, the same global order on every member."""
    for i, a in enumerate(ranks):
        for b in ranks[i + 1:]:
            yield (a, b)
            yield (b, a)


def _gather_kv(engine, order: SplitOrder, rank: int, assignment: dict[str, int], group):
    """KV pieces ``{request_id: {slice: tensor [pages, layers, 2, bs, kv_heads, hd]}}`` this rank
    will own, and the bytes it sent. Only running requests (in the leader's order) have KV."""
    storage, bm = engine.kv_cache.storage, engine.block_manager
    mine = order.slices[order.ranks.index(rank)]
    running = [rid for rid in assignment if bm.block_table(rid)]
    local = {rid: storage[torch.tensor(bm.block_table(rid), device=storage.device)].clone() for rid in running}
    pieces = {rid: {mine: local[rid]} for rid in running if assignment[rid] == rank}
    sent = 0
    for src, dst in _pairs(order.ranks):
        if rank == src:
            batch = {rid: local[rid] for rid in running if assignment[rid] == dst}
            send_object({rid: tuple(t.shape) for rid, t in batch.items()}, dst, group)
            for t in batch.values():
                dist.send(t.contiguous(), dst)
                sent += t.numel() * t.element_size()
        elif rank == dst:
            theirs = order.slices[order.ranks.index(src)]
            for rid, shape in recv_object(src, group).items():
                t = torch.empty(shape, dtype=storage.dtype, device=storage.device)
                dist.recv(t, src)
                pieces.setdefault(rid, {})[theirs] = t
    return pieces, sent


def _restore_full_model(engine, stage_model, restored: dict[str, torch.Tensor]) -> None:
    """Rebuild the whole model from the stage's parameters and the restored ones (both views of
    their weight memory: nothing is copied) and view the KV cache with full-model blocks again."""
    from kunserve.models import build_model

    memory = engine.memory
    memory.kv_cache.storage = None  # the only KV view: released before the re-view
    engine.block_manager.reset(0)
    tensors = {n: p.detach() for n, p in stage_model.named_parameters()} | restored
    with torch.device("meta"):
        full = build_model(engine.model_config)
    for name, _param in list(full.named_parameters()):
        module_path, _, leaf = name.rpartition(".")
        setattr(full.get_submodule(module_path), leaf, torch.nn.Parameter(tensors[name], requires_grad=False))
    engine.model = full.eval()
    memory.executed_units = set(memory.placement.unit_bytes)
    memory.relayout(full.layer_ids)
    engine.block_manager.reset(memory.kv_cache.num_blocks)


def _resume_requests(engine, order: SplitOrder, rank: int, assignment, pieces, group) -> None:
    """The leader hands every member its requests; each writes their KV into full blocks."""
    scheduler, leader = engine.scheduler, order.ranks[0]
    if rank == leader:
        everyone = list(scheduler.running) + list(scheduler.waiting)
        for peer in order.ranks[1:]:
            send_object([r for r in everyone if assignment[r.request_id] == peer], peer, group)
            for r in everyone:
                if assignment[r.request_id] == peer:
                    engine.forget_request(r.request_id)
        mine = [r for r in everyone if assignment[r.request_id] == rank]
    else:
        mine = recv_object(leader, group)
        for r in mine:
            engine.adopt_request(r)
    scheduler.running[:] = sorted((r for r in mine if r.request_id in pieces), key=lambda r: r.metrics.arrival_time)
    scheduler.waiting.clear()
    scheduler.waiting.extend(sorted((r for r in mine if r.request_id not in pieces), key=lambda r: r.metrics.arrival_time))
    storage, bm = engine.kv_cache.storage, engine.block_manager
    for request in scheduler.running:
        bm.allocate(request.request_id, request.num_computed_tokens)
        index = torch.tensor(bm.block_table(request.request_id), device=storage.device)
        for (first, last), data in pieces[request.request_id].items():
            storage[index, first:last] = data
    engine.runner = engine.make_runner()
