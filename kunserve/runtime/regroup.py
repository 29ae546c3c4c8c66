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

from kunserve.runtime.block_manager import BlockManager
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
    kept_in_place: bool


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
    each running request; the kept pages are adopted by the requests themselves."""
    memory, bm = engine.memory, engine.block_manager
    old_first, old_last = engine.model.layer_range
    first, last = order.slice_of(rank)
    ratio, offset = (old_last - old_first) // (last - first), (first - old_first) // (last - first)
    tables = {r.request_id: list(bm.block_table(r.request_id)) for r in engine.scheduler.running}
    memory.executed_units -= set(reslice_model(engine.model, first, last))
    memory.drop_units(memory.placement_units() - memory.executed_units)
    memory.relayout(range(first, last))
    bm.reset(memory.kv_cache.num_blocks)
    outbound: dict[int, dict[str, list[int]]] = {}
    for request_id, table in tables.items():
        bm.adopt(request_id, [b * ratio + offset for b in table])
        for peer, (a, _b) in zip(order.ranks, order.slices):
            if peer != rank:
                pages = [b * ratio + (a - old_first) // (last - first) for b in table]
                bm.adopt(f"outbound:{peer}:{request_id}", pages)
                outbound.setdefault(peer, {})[request_id] = pages
    return outbound


def _exchange(engine, order: MergeOrder, rank: int, outbound, group) -> int:
    """Step 3: pairwise, in one global order (lower rank sends first), so no pair deadlocks."""
    sent = 0
    storage, bm = engine.kv_cache.storage, engine.block_manager
    for i, a in enumerate(order.ranks):
        for b in order.ranks[i + 1:]:
            if rank not in (a, b):
                continue
            peer = b if rank == a else a
            for direction in ((a, b), (b, a)):
                if direction[0] == rank:
                    sent += _send_pages(storage, bm, outbound.get(peer, {}), peer, group)
                else:
                    _recv_pages(engine, peer, group)
    return sent


def _send_pages(storage, bm: BlockManager, pages_by_request: dict[str, list[int]], peer: int, group) -> int:
    manifest = {rid: (len(pages), None) for rid, pages in pages_by_request.items()}
    send_object(manifest, peer, group)
    if not pages_by_request:
        return 0
    index = torch.tensor([p for pages in pages_by_request.values() for p in pages], device=storage.device)
    data = storage[index].contiguous()  # [n_pages, layers, 2, block_size, kv_heads, head_dim]
    dist.send(data, peer)
    for rid in pages_by_request:
        bm.free(f"outbound:{peer}:{rid}")
    return data.numel() * data.element_size()


def _recv_pages(engine, peer: int, group) -> None:
    manifest: dict[str, tuple[int, None]] = recv_object(peer, group)
    if not manifest:
        return
    storage, bm = engine.kv_cache.storage, engine.block_manager
    total = sum(n for n, _ in manifest.values())
    data = torch.empty((total, *storage.shape[1:]), dtype=storage.dtype, device=storage.device)
    dist.recv(data, peer)
    pages = []
    for rid, (n, _) in manifest.items():
        bm.adopt(rid, bm.take_free(n))
        pages += bm.block_table(rid)
    storage[torch.tensor(pages, device=storage.device)] = data


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
    stats = MergeStats(sent, time.perf_counter() - start, order.aligned)
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
