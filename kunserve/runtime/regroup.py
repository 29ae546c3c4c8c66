"""Executing a drop: single instances merge into one pipeline group (see docs/design-drop.md).

Every member of a ``MergeOrder`` runs ``merge_into_group`` in the same cluster step:

1. re-slice its model to its stage's layers and drop the other layers' weights into its KV
   cache (VMM: the chunks move, no copy);
2. re-view the KV cache with the new block shape. Block-major layout makes an old block of
   ``L`` layers exactly ``L / l`` new blocks of ``l`` layers, so a running request's KV for the
   kept layers stays where it is (old block ``b`` -> new block ``b * L / l + k``) and the KV of
   the peers' layers sits in the other new blocks, ready to send;
3. exchange KV with every peer: only peer-owned layers move, ``(g - 1) / g`` of each request;
4. hand its requests (running, with their KV now on every member, and waiting) to the leader,
   whose scheduler then serves the merged queue; the others become stage workers.

The merge runs stop-the-world for the group's members (one cluster step); requests on other
instances keep running. A merge whose slices do not divide the layer count evenly cannot keep
KV in place: it preempts the members' running requests, which the group recomputes.
"""

from __future__ import annotations

import logging
import time

import attrs
import torch
import torch.distributed as dist

from kunserve.policy.drop import Group
from kunserve.policy.exchange import ResidentRequest, plan_exchange
from kunserve.runtime.pipeline import GroupLayout, PipelineRunner, StageWorker
from kunserve.runtime.transport import recv_object, send_object

log = logging.getLogger(__name__)

LayerRange = tuple[int, int]


@attrs.frozen
class MergeOrder:
    """Ranks in pipeline order with their layer slices; the first rank leads the group."""

    ranks: tuple[int, ...]
    slices: tuple[LayerRange, ...]

    def slice_of(self, rank: int) -> LayerRange:
        return self.slices[self.ranks.index(rank)]

    @property
    def aligned(self) -> bool:
        """Every slice has the same length and tiles the model: KV can stay in place."""
        lengths = {b - a for a, b in self.slices}
        return len(lengths) == 1 and all(a % (b - a) == 0 for a, b in self.slices)


@attrs.frozen
class MergeStats:
    bytes_sent: int
    seconds: float


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


def _relayout(engine, order: MergeOrder, rank: int) -> dict[int, dict[str, list[int]]]:
    """Steps 1-2. Returns, per peer rank, the pages (new layout) holding that peer's layers of
    each running request; the kept pages are adopted by the requests themselves. Which layers
    go where is the exchange planner's decision."""
    memory, bm = engine.memory, engine.block_manager
    old_first, old_last = engine.model.layer_range
    first, last = order.slice_of(rank)
    width = last - first  # layers per new block; every slice has this width (aligned merge)
    ratio = (old_last - old_first) // width
    residents = [ResidentRequest(r.request_id, rank, r.num_computed_tokens, tuple(bm.block_table(r.request_id)))
                 for r in engine.scheduler.running]
    plan = plan_exchange((Group((rank,), ((old_first, old_last),)),), Group(order.ranks, order.slices), residents)
    memory.executed_units -= set(reslice_model(engine.model, first, last))
    memory.drop_units(memory.placement_units() - memory.executed_units)
    memory.relayout(range(first, last))
    bm.reset(memory.kv_cache.num_blocks)

    def pages(transfer) -> list[int]:  # old block b, layers at offset k*width -> new block b*ratio + k
        return [b * ratio + (transfer.layers[0] - old_first) // width for b in transfer.src_pages]

    for kept in plan.kept:
        bm.adopt(kept.request_id, pages(kept))
    outbound: dict[int, dict[str, list[int]]] = {}
    for move in plan.transfers:
        bm.adopt(f"outbound:{move.dst}:{move.request_id}", pages(move))
        outbound.setdefault(move.dst, {})[move.request_id] = pages(move)
    return outbound


def _exchange(engine, order: MergeOrder, rank: int, outbound: dict[int, dict[str, list[int]]], group) -> int:
    """Step 3. Manifests go pairwise in one global order; then, peer by peer, this member posts
    its send (non-blocking), receives the peer's pages into a buffer and frees what it sent, so
    received pages are allocated only once the outbound ones are free (a full member still has
    room). Returns the bytes sent."""
    storage, bm = engine.kv_cache.storage, engine.block_manager
    manifests: dict[int, dict[str, int]] = {}
    for src, dst in _pairs(order.ranks):
        if rank == src:
            send_object({rid: len(pages) for rid, pages in outbound.get(dst, {}).items()}, dst, group)
        elif rank == dst:
            manifests[src] = recv_object(src, group)
    sent, incoming = 0, []
    for peer in (p for p in order.ranks if p != rank):
        mine = outbound.get(peer, {})
        work = None
        if mine:
            index = torch.tensor([p for pages in mine.values() for p in pages], device=storage.device)
            data = storage[index].contiguous()  # [pages, layers, 2, block_size, kv_heads, head_dim]
            work = dist.isend(data, peer)
            sent += data.numel() * data.element_size()
        if manifests[peer]:
            buffer = torch.empty((sum(manifests[peer].values()), *storage.shape[1:]), dtype=storage.dtype,
                                 device=storage.device)
            dist.recv(buffer, peer)
            incoming.append((manifests[peer], buffer))
        if work is not None:
            work.wait()
            for rid in mine:
                bm.free(f"outbound:{peer}:{rid}")
    for manifest, buffer in incoming:
        pages = []
        for rid, count in manifest.items():
            bm.adopt(rid, bm.take_free(count))
            pages += bm.block_table(rid)
        storage[torch.tensor(pages, device=storage.device)] = buffer
    return sent


def _gather_requests(engine, order: MergeOrder, rank: int, group) -> None:
    """Step 4: every member's requests move to the leader's scheduler (FCFS by arrival)."""
    scheduler = engine.scheduler
    if rank != order.ranks[0]:
        send_object((list(scheduler.running), list(scheduler.waiting)), order.ranks[0], group)
        scheduler.running.clear()
        scheduler.waiting.clear()
        engine.requests.clear()
        return
    for peer in order.ranks[1:]:
        running, waiting = recv_object(peer, group)
        scheduler.running += running
        scheduler.waiting.extend(waiting)
        for request in running + waiting:
            engine.requests[request.request_id] = request
            engine._text_len[request.request_id] = 0
    scheduler.running.sort(key=lambda r: r.metrics.arrival_time)
    ordered = sorted(scheduler.waiting, key=lambda r: r.metrics.arrival_time)
    scheduler.waiting.clear()
    scheduler.waiting.extend(ordered)


def merge_into_group(engine, order: MergeOrder, rank: int, group):
    """Run this rank's part of a merge; returns (StageWorker or None for the leader, stats)."""
    start = time.perf_counter()
    if not order.aligned:
        while engine.scheduler.preempt_newest():
            pass  # KV cannot stay in place: the group recomputes these requests
    outbound = _relayout(engine, order, rank)
    sent = _exchange(engine, order, rank, outbound, group)
    _gather_requests(engine, order, rank, group)
    capacity = _group_capacity(engine, order, rank, group)
    layout = GroupLayout(order.ranks, group, None)
    engine.block_manager.reserved = engine.block_manager.num_blocks - capacity
    stats = MergeStats(sent, time.perf_counter() - start)
    log.info("rank %d merged into group %s as stage %s: KV blocks %d (group %d), %d bytes sent, %.3f s",
             rank, order.ranks, order.slice_of(rank), engine.block_manager.num_blocks, capacity, sent, stats.seconds)
    if rank == order.ranks[0]:
        engine.runner = PipelineRunner(engine.model, engine.kv_cache, engine.block_manager, engine.scheduler,
                                       engine.device, rank, layout, engine.config.seed,
                                       holding={r.request_id for r in engine.scheduler.running})
        return None, stats
    return StageWorker(engine.model, engine.kv_cache, engine.block_manager, engine.device, rank, layout), stats


def _group_capacity(engine, order: MergeOrder, rank: int, group) -> int:
    """The smallest member pool: the leader admits only what every member can hold."""
    own = engine.block_manager.num_blocks
    if rank != order.ranks[0]:
        send_object(own, order.ranks[0], group)
        return own
    return min([own] + [recv_object(peer, group) for peer in order.ranks[1:]])


# -- restore: the group splits back into single instances ---------------------------------------

@attrs.frozen
class SplitOrder:
    """Split the group ``ranks`` (pipeline order, ``slices``) back into single instances."""

    ranks: tuple[int, ...]
    slices: tuple[LayerRange, ...]


def split_group(engine, order: SplitOrder, rank: int, group):
    """Run this rank's part of a restore; returns (assignment request -> rank, stats).

    1. the leader assigns every request to a member (running ones balanced by KV blocks);
    2. each member sends its layers' KV of every running request to the request's new owner,
       and its weights to every peer (pulled back from the peer that holds them);
    3. each member takes its dropped chunks back from the KV cache, rebuilds the whole model
       and writes the received KV into full-model blocks; requests resume where they were.
    """
    start = time.perf_counter()
    assignment = _assign(engine, order, rank, group)
    pieces, sent = _gather_kv(engine, order, rank, assignment, group)
    weights, sent_w = _share_weights(engine.model, order, rank, group)
    _restore_full_model(engine, engine.model, weights)
    _resume_requests(engine, order, rank, assignment, pieces, group)
    stats = MergeStats(sent + sent_w, time.perf_counter() - start)
    log.info("rank %d left group %s: %d KV blocks, %d requests, %d bytes sent, %.3f s", rank, order.ranks,
             engine.block_manager.num_blocks, len(engine.requests), stats.bytes_sent, stats.seconds)
    return assignment, stats


def _assign(engine, order: SplitOrder, rank: int, group) -> dict[str, int]:
    leader = order.ranks[0]
    if rank != leader:
        return recv_object(leader, group)
    load = {r: 0 for r in order.ranks}
    assignment = {}
    for request in sorted(engine.scheduler.running, key=lambda r: r.metrics.arrival_time):
        target = min(order.ranks, key=lambda r: (load[r], r))
        assignment[request.request_id] = target
        load[target] += len(engine.block_manager.block_table(request.request_id))
    for i, request in enumerate(engine.scheduler.waiting):
        assignment[request.request_id] = order.ranks[i % len(order.ranks)]
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


def _share_weights(model, order: SplitOrder, rank: int, group):
    """Every member sends its stage's parameters to every peer; returns what it received."""
    received, sent = {}, 0
    own = {n: p.detach() for n, p in model.named_parameters()}
    for src, dst in _pairs(order.ranks):
        if rank == src:
            send_object({n: tuple(p.shape) for n, p in own.items()}, dst, group)
            for p in own.values():
                dist.send(p.contiguous(), dst)
                sent += p.numel() * p.element_size()
        elif rank == dst:
            for name, shape in recv_object(src, group).items():
                t = torch.empty(shape, dtype=next(iter(own.values())).dtype, device=next(iter(own.values())).device)
                dist.recv(t, src)
                received[name] = t
    return received, sent


def _restore_full_model(engine, stage_model, weights: dict[str, torch.Tensor]) -> None:
    """Take the dropped chunks back, refill them from ``weights``, rebuild the whole model and
    view the KV cache with full-model blocks again."""
    from kunserve.models import build_model

    memory = engine.memory
    memory.kv_cache.storage = None  # the only KV view: released before the tail is unmapped
    engine.block_manager.reset(0)
    dropped = list(memory.unified.dropped)
    memory.unified.restore(dropped)
    kept = {n: p for n, p in stage_model.named_parameters()}
    with torch.device("meta"):
        full = build_model(engine.model_config)
    for name, param in list(full.named_parameters()):
        tensor = kept.get(name)
        if tensor is None:
            tensor = memory.placement.allocate(name, param.shape, engine.dtype)
            tensor.copy_(weights[name])
        module_path, _, leaf = name.rpartition(".")
        setattr(full.get_submodule(module_path), leaf, torch.nn.Parameter(tensor, requires_grad=False))
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
                    engine.requests.pop(r.request_id, None)
                    engine._text_len.pop(r.request_id, None)
        mine = [r for r in everyone if assignment[r.request_id] == rank]
    else:
        mine = recv_object(leader, group)
        for r in mine:
            engine.requests[r.request_id] = r
            engine._text_len[r.request_id] = 0
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
