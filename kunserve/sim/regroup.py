"""``--policy kunserve`` in the simulator: the real drop controller's orders, when they are issued
(``Regroups``) and how they are executed.

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
- restore, in the runtime's two phases: ``pull`` (the group keeps serving; one round of weight
  units after each step, overlapping it like the exchange; admission capped at the final pool),
  then ``split`` (the members pause while the KV of each running request moves to its new owner,
  then serve alone).
"""

from __future__ import annotations

import logging

from kunserve.policy.drop import Group
from kunserve.policy.exchange import (PageTransfer, ResidentRequest, assign_owners, plan_exchange,
                                      schedule_exchange)
from kunserve.policy.overload import OverloadRules
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.drop_controller import DropController
from kunserve.runtime.kv_exchange import LeaderExchange, outbound_owner
from kunserve.runtime.regroup import MergeOrder, SplitOrder
from kunserve.runtime.scheduler import Scheduler
from kunserve.sim.config import SimConfig
from kunserve.sim.hardware import Link
from kunserve.sim.instance import Unit, UnitState

log = logging.getLogger(__name__)


def _arrival(request) -> float:
    return request.metrics.arrival_time


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


class SimWeightPull:
    """The ``pull`` phase of a restore while the group keeps serving: round ``k`` (one after each
    group step, as ``runtime/weight_restore.py`` runs them) gives every member back its ``k``-th
    dropped unit from the member that executes it. The leader caps admission at the smallest
    pool the members will have once all weights are back (``BlockManager.reserved``).
    Invariant: ``rounds[k]`` maps member -> (bytes in, bytes out) of round ``k``."""

    def __init__(self, order: SplitOrder, layout, bm: BlockManager, final_pool: int, link: Link, lanes: int):
        owner = {}
        for m, (a, b) in zip(order.ranks, order.slices):
            owner.update({layer: m for layer in range(a, b)})
        owner["embed"], owner["head"] = order.ranks[0], order.ranks[-1]
        size = {**{i: n for i, n in enumerate(layout.layer_bytes)}, "embed": layout.embed_bytes, "head": layout.head_bytes}
        units = {m: [u for u in size if owner[u] != m and size[u]] for m in order.ranks}
        self.rounds = []
        for k in range(max(len(u) for u in units.values())):
            traffic = {m: [0, 0] for m in order.ranks}
            for m, mine in units.items():
                if k < len(mine):
                    traffic[m][0] += size[mine[k]]
                    traffic[owner[mine[k]]][1] += size[mine[k]]
            self.rounds.append(traffic)
        self.round, self.link, self.lanes = 0, link, lanes
        self.total_bytes = 0
        bm.reserved = max(bm.reserved, bm.num_blocks - final_pool)

    @property
    def done(self) -> bool:
        return self.round >= len(self.rounds)

    def next_round_seconds(self) -> float:
        busiest = max(max(into, out) for into, out in self.rounds[self.round].values())
        return self.link.seconds(busiest, self.lanes)

    def run_round(self, now: float) -> list[str]:
        self.total_bytes += sum(into for into, _ in self.rounds[self.round].values())
        self.round += 1
        return []


def start_pull(order: SplitOrder, unit, drop: DropController, config) -> SimWeightPull:
    """Begin the ``pull`` phase on ``unit`` (at a boundary)."""
    per_layer = drop.full_block_bytes // config.shape.num_layers
    final_pool = min(drop.kv_mapped_bytes // (per_layer * (b - a)) for a, b in order.slices)
    return SimWeightPull(order, drop.layout, unit.bm, final_pool, config.link_spec, config.tp)


def split(order: SplitOrder, unit, drop: DropController, config, make_unit) -> tuple[list, float, int]:
    """Execute the ``split`` phase on the paused group ``unit`` (its weights are back); returns
    (single units, seconds the members are paused, KV bytes moved). Assignment as
    ``runtime.regroup``: running requests in arrival order to the member holding the fewest KV
    blocks so far, queued ones round-robin (``policy.exchange.assign_owners``);
    each member sends its layers' KV of a request to the
    request's new owner, which resumes it where it was."""
    shape, bs, ranks = config.shape, config.block_size, order.ranks
    scheduler = unit.scheduler
    assert not scheduler.stalled, "groups still exchanging KV are never split"
    owner = assign_owners(scheduler.running, scheduler.waiting, ranks, lambda rid: len(unit.bm.block_table(rid)))
    out, into = {m: 0 for m in ranks}, {m: 0 for m in ranks}
    for request in scheduler.running:
        dst = owner[request.request_id]
        for m, (a, b) in zip(ranks, order.slices):
            if m != dst:
                nbytes = request.num_computed_tokens * shape.kv_bytes_per_token_layer * (b - a)
                out[m] += nbytes
                into[dst] += nbytes
    seconds = config.regroup_overhead_s + max(config.link_spec.seconds(max(out[m], into[m]), config.tp) for m in ranks)
    singles = []
    for m in ranks:
        mine = sorted((r for r in scheduler.running if owner[r.request_id] == m), key=_arrival)
        queued = sorted((r for r in scheduler.waiting if owner[r.request_id] == m), key=_arrival)
        s = Scheduler(BlockManager(config.instance_blocks, bs), *config.limits(1))
        for request in mine:
            if s.block_manager.can_allocate(request.request_id, request.num_computed_tokens):
                s.block_manager.allocate(request.request_id, request.num_computed_tokens)
                s.running.append(request)
            else:  # not expected under the 50% restore rule; if it happens, recompute it there
                s.preempt(request)
        s.waiting.extend(queued)
        singles.append(make_unit(m, (m,), ((0, shape.num_layers),), s, None))
    drop.restored(order)
    return singles, seconds, sum(out.values())


class Regroups:
    """Drop / restore orders from the runtime's ``DropController`` (on the simulated clock,
    its ``clock``), executed by ``merge``, ``start_pull`` and
    ``split`` below. Merges and splits wait until every unit involved is at a boundary; a
    ``pull`` starts at the group's next boundary and runs while it serves. While any order is
    not yet in effect the controller is not asked again (the runtime's rank 0 executes orders
    in the very next step, so it never sees them pending)."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.drop = DropController(
            config.shape.weight_layout(config.weight_granularity), config.full_block_bytes, config.kv_mapped_bytes,
            OverloadRules(config.restore_fraction, config.min_hold_s), config.max_group_size,
            exchange_chunk_bytes=config.exchange_chunk_bytes(), micro_batcher=config.micro_batcher("kunserve"),
            clock=lambda: self.now, pipeline_overlap=config.pipeline_overlap)
        self.now = 0.0  # simulated seconds: the controller's clock
        self.waiting: list[tuple] = []  # (order, unit ids) of merges / splits not executed yet
        self.activating = 0  # executed, new units not stepping yet
        self.pulls_pending = 0  # pull orders not yet applied at the group's boundary
        self.merges = self.splits = 0
        self.exchange_bytes = self.restore_bytes = 0
        self.merge_pauses: list[float] = []
        self.restore_seconds: list[float] = []
        self.events: list[tuple[float, str, tuple]] = []  # (time, "drop" | "pull" | "restore", members)
        self.exchanges: list = []  # SimLeaderExchange of every merge (stall times)
        self.pulls: list = []  # SimWeightPull of every restore

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.activating > 0 or self.pulls_pending > 0

    def on_monitor(self, sim, now: float) -> None:
        if self.busy:
            return
        snapshot = sim.cluster_snapshot()
        self.now = now
        orders = self.drop.plan(snapshot) + self.drop.plan_restore(snapshot)
        for order in orders:
            self._issue(sim, order, now)

    def on_eventful(self, sim, unit: Unit, now: float) -> None:
        if unit.boundary.num_waiting:  # the only way a step can create overload
            self.on_monitor(sim, now)

    def _issue(self, sim, order, now: float) -> None:
        if isinstance(order, SplitOrder) and order.phase == "pull":
            self.pulls_pending += 1
            self.events.append((now, "pull", order.ranks))

            def begin_pull(unit: Unit, _t: float) -> None:
                self.pulls_pending -= 1
                unit.pull = start_pull(order, unit, self.drop, self.config)
                self.pulls.append(unit.pull)

            sim.deliver(order.ranks[0], begin_pull, now, drain_first=True)  # the runtime drains first
            return
        if isinstance(order, MergeOrder):
            uids = [g.members[0] for g in order.source_groups]
        else:
            uids = [order.ranks[0]]
        self.waiting.append((order, uids))
        for uid in uids:
            sim.units[uid].pending = order
            sim.interrupt(uid, now)
        self.try_execute(sim, now)

    def try_execute(self, sim, now: float) -> None:
        ready = [(o, uids) for o, uids in self.waiting if all(sim.units[u].state is UnitState.PAUSED for u in uids)]
        for order, uids in ready:
            self.waiting.remove((order, uids))
            units = [sim.units[u] for u in uids]
            for unit in units:
                unit._apply_inbox(now)  # requests that arrived while it was paused
            if isinstance(order, MergeOrder):
                group, pause, nbytes = merge(order, units, self.drop, self.config, sim.make_unit, now)
                self.now = now
                self.drop.merged()
                self.merges += 1
                self.exchange_bytes += nbytes
                self.merge_pauses.append(pause)
                self.exchanges.append(group.exchange)
                self.events.append((now, "drop", order.ranks))
                sim.replace_units(units, [group], now + pause)
            else:
                singles, seconds, nbytes = split(order, units[0], self.drop, self.config, sim.make_unit)
                self.splits += 1
                self.restore_bytes += nbytes
                self.restore_seconds.append(seconds)
                self.events.append((now, "restore", order.ranks))
                sim.replace_units(units, singles, now + seconds)

    def metrics(self) -> dict:
        stalls = [s for e in self.exchanges for s in e.sim_stalls]
        return {"drops": self.merges, "restores": self.splits, "drop_fallbacks": self.drop.fallbacks,
                "kv_bytes_exchanged": self.exchange_bytes, "split_kv_bytes": self.restore_bytes,
                "weight_bytes_pulled": sum(p.total_bytes for p in self.pulls),
                "merge_pause_s_max": max(self.merge_pauses, default=0.0),
                "split_pause_s_max": max(self.restore_seconds, default=0.0),
                "exchanged_requests": len(stalls), "exchange_stall_s_max": max(stalls, default=0.0),
                "exchange_stall_s_mean": sum(stalls) / len(stalls) if stalls else 0.0,
                "events": [(round(t, 6), kind, list(members)) for t, kind, members in self.events]}
