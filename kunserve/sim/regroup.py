"""``--policy kunserve`` in the simulator: the real drop controller's orders, executed.

Decisions are the runtime's objects: ``DropController`` (``OverloadRules`` trigger and restore
rule, ``GreedyDropPlanner`` plan, ``MergeOrder`` / ``SplitOrder``), ``plan_exchange`` and
``schedule_exchange`` for the KV exchange, and ``LeaderExchange``'s admission budget and resume
logic. This module executes them the way ``runtime/regroup.py`` does, on bookkeeping instead of
tensors, and charges time for it:

- merge: the source units finish their step in flight and pause; the merge itself moves no KV
  (the re-view is in place) and costs the VMM remap of each member's dropped weights
  (``hardware.VMMCost``, per GPU in parallel); then the group steps while one exchange round
  runs after each step (``UnitEnv.exchange_overlap``: the round overlaps the step, as the
  coordinated exchange sends KV between activations; else it adds to it). A round takes the
  busiest member's bytes over the link;
- restore (split): stop-the-world, as the runtime does: every member pulls the weights it
  dropped and the KV of the requests it is assigned, then serves alone.
"""

from __future__ import annotations

import logging

from kunserve.policy.drop import Group
from kunserve.policy.exchange import PageTransfer, ResidentRequest, plan_exchange, schedule_exchange
from kunserve.policy.snapshot import ClusterSnapshot
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.drop_controller import DropController
from kunserve.runtime.kv_exchange import LeaderExchange, outbound_owner
from kunserve.runtime.regroup import MergeOrder, SplitOrder
from kunserve.runtime.scheduler import Scheduler
from kunserve.sim.hardware import Link

log = logging.getLogger(__name__)


def _arrival(request) -> float:
    return request.metrics.arrival_time


class SimDropController(DropController):
    """The runtime's ``DropController`` on the simulated clock.

    ``DropController`` reads ``time.monotonic()`` for the merge time of a group and for "now" in
    ``plan_restore``; here both are the simulated ``now`` (set by the simulator before each
    call). ``plan_restore`` repeats the runtime's loop (skip exchanging groups, capacity = no-drop
    blocks x members) and asks the same ``OverloadRules.should_restore``.
    """

    now = 0.0

    def plan_for(self, snapshot, required, prefer=frozenset()):
        orders = super().plan_for(snapshot, required, prefer)
        for order in orders:
            self.groups[order.ranks[0]] = (order, self.now)
        return orders

    def plan_restore(self, snapshot: ClusterSnapshot) -> list[SplitOrder]:
        orders = []
        no_drop_blocks = self.kv_mapped_bytes // self.full_block_bytes
        for leader, (order, merged_at) in self.groups.items():
            instance = snapshot.by_id(leader)
            if instance.exchanging:
                continue
            capacity = no_drop_blocks * len(order.ranks)
            if self.rules.should_restore(instance.used_blocks + instance.queued_blocks, capacity, merged_at, self.now):
                orders.append(SplitOrder(order.ranks, order.slices))
        return orders


class SimLeaderExchange(LeaderExchange):
    """``LeaderExchange`` without tensors: a round frees the leader's sent pages and allocates
    what it receives (the order ``KVExchange.run_round`` uses: sends are staged out first), then
    applies the runtime's own budget and resume steps. Stall times are simulated seconds."""

    def __init__(self, rank, schedule, block_manager, scheduler, now: float, link: Link, lanes: int,
                 page_bytes: int):
        super().__init__(rank, schedule, None, block_manager, scheduler, stalled_since=now)
        self.link, self.lanes, self.page_bytes = link, lanes, page_bytes
        self.sim_stalls: list[float] = []
        self.total_bytes = 0

    def next_round_seconds(self) -> float:
        """The busiest member's larger direction over the link (links are full duplex)."""
        out, into = {}, {}
        for p in self.schedule.rounds[self.round]:
            out[p.src] = out.get(p.src, 0) + p.num_pages * self.page_bytes
            into[p.dst] = into.get(p.dst, 0) + p.num_pages * self.page_bytes
        busiest = max([*out.values(), *into.values()], default=0)
        return self.link.seconds(busiest, self.lanes)

    def run_round(self, now: float) -> list[str]:
        bm = self.block_manager
        pieces = self.schedule.rounds[self.round]
        for p in pieces:
            if p.src == self.rank:
                bm.free_first(outbound_owner(p.dst, p.request_id), p.num_pages)
        for p in pieces:
            if p.dst == self.rank:
                have = len(bm.block_table(p.request_id))
                bm.allocate(p.request_id, (have + p.num_pages) * bm.block_size)
        self.total_bytes += sum(p.num_pages for p in pieces) * self.page_bytes
        ready = self.schedule.ready_in_round(self.round)
        self.round += 1
        self._apply_budget()
        resumed = self._resume(ready)
        self.stalls.clear()  # wall-clock stalls of the runtime class; the simulated ones:
        self.sim_stalls += [now - self.stalled_since] * len(resumed)
        return resumed


def merge(order: MergeOrder, sources: list, drop: DropController, config, make_unit, now: float):
    """Execute ``order`` on the paused ``sources`` (units led by each source group's first
    member); returns (the group unit, seconds until it can step, bytes of KV to exchange)."""
    shape, bs = config.shape, config.block_size
    by_leader = {u.uid: u for u in sources}
    units = [by_leader[g.members[0]] for g in order.source_groups]
    if not order.aligned:  # KV cannot stay in place: the group recomputes (runtime: _live_requests)
        for unit in units:
            while unit.scheduler.preempt_newest():
                pass
    running = sorted((r for u in units for r in u.scheduler.running), key=_arrival)
    waiting = sorted((r for u in units for r in u.scheduler.waiting), key=_arrival)
    merged = Group(order.ranks, order.slices)
    residents = [ResidentRequest(r.request_id, member, r.num_computed_tokens,
                                 tuple(range(len(unit.bm.block_table(r.request_id)))))
                 for group, unit in zip(order.source_groups, units) for r in unit.scheduler.running
                 for member in group.members]
    plan = plan_exchange(order.source_groups, merged, residents)
    held = {m: 0 for m in order.ranks}
    for t in plan.kept + plan.transfers:
        held[t.src] += len(t.src_pages)
    per_layer = drop.full_block_bytes // shape.num_layers
    pools = {m: (drop.kv_mapped_bytes + drop.freed.get(m, 0)) // (per_layer * (b - a))
             for m, (a, b) in zip(order.ranks, order.slices)}
    leader = order.ranks[0]
    assert min(pools.values()) == drop.predicted_blocks[leader], "the group's capacity is the planner's prediction"
    arrival_index = {r.request_id: i for i, r in enumerate(running)}
    transfers = sorted((PageTransfer(t.request_id, t.src, t.dst, len(t.src_pages)) for t in plan.transfers),
                       key=lambda t: (arrival_index[t.request_id], t.src, t.dst))
    width = order.slices[0][1] - order.slices[0][0]
    page_bytes = bs * shape.kv_bytes_per_token_layer * width
    schedule = schedule_exchange(transfers, held, pools, max(1, order.chunk_bytes // page_bytes))

    bm = BlockManager(pools[leader], bs)  # the leader's pages: kept ones and those bound for peers
    for t in plan.kept:
        if t.src == leader:
            bm.allocate(t.request_id, len(t.src_pages) * bs)
    for t in plan.transfers:
        if t.src == leader:
            bm.allocate(outbound_owner(t.dst, t.request_id), len(t.src_pages) * bs)
    scheduler = Scheduler(bm, *config.limits(len(order.ranks)))
    for request in running:
        scheduler.stall(request)
    scheduler.waiting.extend(waiting)
    unit = make_unit(leader, order.ranks, order.slices, scheduler, order.micro_batcher)
    unit.exchange = SimLeaderExchange(leader, schedule, bm, scheduler, now, config.link_spec, config.tp, page_bytes)
    unit.exchange.start()
    pause = config.regroup_overhead_s + max(config.vmm.seconds(b // config.tp) for b in _new_drops(order, drop))
    return unit, pause, sum(p.num_pages for p in transfers) * page_bytes


def _new_drops(order: MergeOrder, drop: DropController) -> list[int]:
    """Weight bytes each member drops in this merge: what it holds now minus what it held."""
    layout = drop.layout
    old = {m: layout.slice_bytes(s) for g in order.source_groups for m, s in zip(g.members, g.slices)}
    return [old[m] - layout.slice_bytes(s) for m, s in zip(order.ranks, order.slices)]


def split(order: SplitOrder, unit, drop: DropController, config, make_unit) -> tuple[list, float, int]:
    """Execute a restore on the paused group ``unit``; returns (single units, seconds the
    members are stopped, bytes moved). Assignment as ``runtime.regroup._assign``: running
    requests in arrival order to the member holding the fewest KV blocks so far, queued ones
    round-robin; each resumes where it was (its KV is gathered to its new owner)."""
    shape, bs, ranks = config.shape, config.block_size, order.ranks
    layout = drop.layout
    scheduler = unit.scheduler
    assert not scheduler.stalled, "groups still exchanging KV are never split"
    load, owner = {m: 0 for m in ranks}, {}
    for request in sorted(scheduler.running, key=_arrival):
        target = min(ranks, key=lambda m: (load[m], m))
        owner[request.request_id] = target
        load[target] += len(unit.bm.block_table(request.request_id))
    for i, request in enumerate(scheduler.waiting):
        owner[request.request_id] = ranks[i % len(ranks)]
    out, into = {m: 0 for m in ranks}, {m: 0 for m in ranks}
    for request in scheduler.running:  # each member sends its layers of a request to its new owner
        dst = owner[request.request_id]
        for m, (a, b) in zip(ranks, order.slices):
            if m != dst:
                nbytes = request.num_computed_tokens * shape.kv_bytes_per_token_layer * (b - a)
                out[m] += nbytes
                into[dst] += nbytes
    stage = {m: layout.slice_bytes(s) for m, s in zip(ranks, order.slices)}
    for m in ranks:  # every member sends its stage's weights to every peer
        out[m] += stage[m] * (len(ranks) - 1)
        into[m] += layout.total_bytes - stage[m]
    seconds = config.regroup_overhead_s + max(config.link_spec.seconds(max(out[m], into[m]), config.tp)
                  + config.vmm.seconds((layout.total_bytes - stage[m]) // config.tp) for m in ranks)
    singles = []
    for m in ranks:
        mine = [r for r in scheduler.running if owner[r.request_id] == m]
        queued = sorted((r for r in scheduler.waiting if owner[r.request_id] == m), key=_arrival)
        s = Scheduler(BlockManager(config.instance_blocks, bs), *config.limits(1))
        for request in sorted(mine, key=_arrival):
            if s.block_manager.can_allocate(request.request_id, request.num_computed_tokens):
                s.block_manager.allocate(request.request_id, request.num_computed_tokens)
                s.running.append(request)
            else:  # not expected under the 50% restore rule; if it happens, recompute it there
                s.preempt(request)
        s.waiting.extend(queued)
        singles.append(make_unit(m, (m,), ((0, shape.num_layers),), s, None))
    drop.restored(order)
    return singles, seconds, sum(out.values())
