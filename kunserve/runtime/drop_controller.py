"""Rank 0's drop trigger: turns overload in the cluster snapshot into merge orders.

Decisions come from the policies (``OverloadRules`` says when and how much, the greedy planner
says who merges with whom); this object only keeps the state between steps (which instances
are already grouped, whether a fallback was already reported) and the counters for /metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from kunserve.policy.drop import GreedyDropPlanner, Group, WeightLayout
from kunserve.policy.overload import OverloadRules
from kunserve.policy.snapshot import ClusterSnapshot
from kunserve.runtime.kv_exchange import ExchangeProgress
from kunserve.runtime.regroup import DEFAULT_EXCHANGE_CHUNK_BYTES, MergeOrder, SplitOrder

log = logging.getLogger(__name__)


def weight_layout_of(memory, num_layers: int) -> WeightLayout:
    """Bytes each weight unit frees when dropped: its chunk, rounded up to the granularity."""
    granularity = memory.unified.backend.granularity
    chunk = {u: -(-n // granularity) * granularity for u, n in memory.placement.unit_bytes.items()}
    return WeightLayout(tuple(chunk[i] for i in range(num_layers)), chunk.get("embed", 0), chunk.get("head", 0))


class DropController:
    """Invariant: ``groups`` holds every live group (leader -> its merge order and time) and
    ``freed`` what each grouped instance has dropped so far; instances in no group are single.
    Groups merge again (2 + 2 -> 4) when a later overload needs it, once their KV exchange is done."""

    def __init__(self, layout: WeightLayout, full_block_bytes: int, kv_mapped_bytes: int,
                 rules: OverloadRules | None = None, max_group_size: int | None = None,
                 exchange_chunk_bytes: int = DEFAULT_EXCHANGE_CHUNK_BYTES, micro_batcher=None,
                 clock: Callable[[], float] = time.monotonic, pipeline_overlap: bool = True):
        self.layout, self.full_block_bytes, self.kv_mapped_bytes = layout, full_block_bytes, kv_mapped_bytes
        self.planner = GreedyDropPlanner(layout, max_group_size)
        self.rules = rules or OverloadRules()
        self.exchange_chunk_bytes, self.micro_batcher = exchange_chunk_bytes, micro_batcher
        self.pipeline_overlap = pipeline_overlap  # groups keep steps in flight (MergeOrder.overlap)
        self.clock = clock  # seconds; merge times, the restore hold, metrics (the simulator passes its own)
        self.drops = self.restores = self.fallbacks = self.bytes_exchanged = self.restore_bytes = 0
        self.groups: dict[int, tuple[MergeOrder, float]] = {}  # leader -> (order, merge time)
        self.freed: dict[int, int] = {}  # grouped instance -> weight bytes it dropped so far
        self.restoring: set[int] = set()  # leaders of groups pulling their weights back
        self.merge_pause_seconds = self.restore_seconds = 0.0  # longest merge / split step
        self.request_stalls: list[float] = []  # per exchanged request: seconds its KV was in transit
        self.overlapped_requests = 0  # queued requests that ran while an exchange was in progress
        self.detect_to_capacity_seconds = 0.0  # overload seen -> merged group's blocks admissible
        self._detected_at: float | None = None
        self.predicted_blocks: dict[int, int] = {}  # group leader -> planner-predicted capacity
        self._reported_fallback = False

    @property
    def grouped(self) -> set[int]:
        """Instances that are members of a live group."""
        return {rank for order, _ in self.groups.values() for rank in order.ranks}

    def current_groups(self, snapshot: ClusterSnapshot) -> list[Group]:
        """What the planner may merge: single instances and live groups neither moving KV nor
        being restored."""
        grouped = self.grouped
        busy = {i.instance_id for i in snapshot.instances if i.exchanging} | self.restoring
        groups = [Group(order.ranks, order.slices) for leader, (order, _) in self.groups.items() if leader not in busy]
        return groups + [Group.single(i.instance_id, self.layout.num_layers)
                         for i in snapshot.instances if i.instance_id not in grouped]

    def plan(self, snapshot: ClusterSnapshot) -> list[MergeOrder]:
        if not any(self.rules.is_overloaded(i) for i in snapshot.instances):
            self._reported_fallback = False
            return []
        required = self.rules.required_bytes(snapshot, self.full_block_bytes)
        overloaded = frozenset(i.instance_id for i in snapshot.instances if self.rules.is_overloaded(i))
        return self.plan_for(snapshot, required, overloaded)

    def plan_for(self, snapshot: ClusterSnapshot, required: int, prefer: frozenset[int] = frozenset()) -> list[MergeOrder]:
        """Merge orders that free ``required`` bytes (all the planner can if none does)."""
        plan = self.planner.plan(self.current_groups(snapshot), required, prefer=prefer)
        if not plan.satisfied and not self._reported_fallback:
            self._reported_fallback = True
            self.fallbacks += 1
            log.warning("overload needs %d bytes of KV but dropping frees at most %d: falling back to "
                        "recompute preemption; the cluster needs more instances", required, plan.total_freed_bytes)
        if plan.merged:
            self._detected_at = self.clock()
        orders = []
        for group, sources in zip(plan.merged, plan.sources):
            for source in sources:
                self.groups.pop(source.members[0], None)
                self.predicted_blocks.pop(source.members[0], None)
            for member in group.members:
                self.freed[member] = self.freed.get(member, 0) + plan.freed_bytes.get(member, 0)
            order = MergeOrder(group.members, group.slices, sources, self.exchange_chunk_bytes, self.micro_batcher,
                               self.pipeline_overlap)
            self.groups[group.members[0]] = (order, self.clock())
            self.predicted_blocks[group.members[0]] = self._predicted_capacity(group)
            log.info("drop: groups %s merge into pipeline %s with slices %s (predicted capacity %d blocks)",
                     [s.members for s in sources], group.members, group.slices, self.predicted_blocks[group.members[0]])
            orders.append(order)
        return orders

    def plan_restore(self, snapshot: ClusterSnapshot) -> list[SplitOrder]:
        """Restore in two phases: groups whose KV use fell under the restore fraction of their
        no-drop capacity start pulling their weights back (``pull``); groups whose pull is done
        split (``split``). A group busy moving KV or weights gets no order."""
        orders, now = [], self.clock()
        no_drop_blocks = self.kv_mapped_bytes // self.full_block_bytes
        for leader, (order, merged_at) in self.groups.items():
            instance = snapshot.by_id(leader)
            if instance.exchanging:
                continue  # KV or weights still moving: another order now would race them
            if leader in self.restoring:
                orders.append(SplitOrder(order.ranks, order.slices, "split"))
                continue
            capacity = no_drop_blocks * len(order.ranks)
            if self.rules.should_restore(instance.used_blocks + instance.queued_blocks, capacity, merged_at, now):
                self.restoring.add(leader)
                orders.append(SplitOrder(order.ranks, order.slices, "pull"))
                log.info("restore: group %s uses %d of %d no-drop blocks; pulling its weights back", order.ranks,
                         instance.used_blocks, capacity)
        return orders

    def restored(self, order: SplitOrder) -> None:
        self.restoring.discard(order.ranks[0])
        self.groups.pop(order.ranks[0], None)
        self.predicted_blocks.pop(order.ranks[0], None)
        for member in order.ranks:
            self.freed.pop(member, None)
        self.restores += 1

    def _predicted_capacity(self, group: Group) -> int:
        """Blocks the group can hold: the smallest member's KV bytes over its new block size."""
        per_layer = self.full_block_bytes // self.layout.num_layers
        return min((self.kv_mapped_bytes + self.freed.get(m, 0)) // (per_layer * (b - a))
                   for m, (a, b) in zip(group.members, group.slices))

    def record_merge(self, seconds: float) -> None:
        self.merge_pause_seconds = max(self.merge_pause_seconds, seconds)

    def record_split(self, bytes_sent: int, seconds: float) -> None:
        self.restore_bytes += bytes_sent  # weights pulled back + KV gathered to the new owners
        self.restore_seconds = max(self.restore_seconds, seconds)

    def record_exchange(self, progress: list[ExchangeProgress]) -> None:
        """One cluster step of running exchanges, as every rank in one reported it."""
        for p in progress:
            self.bytes_exchanged += p.bytes_sent
            self.request_stalls += p.request_stalls
            self.overlapped_requests += p.overlapped_requests

    def merged(self) -> None:
        """The merge step finished: the queued requests are admitted from the next step on."""
        self.drops += 1
        if self._detected_at is not None:
            self.detect_to_capacity_seconds = max(self.detect_to_capacity_seconds, self.clock() - self._detected_at)

    def metrics(self) -> dict:
        return {
            "drops_total": self.drops, "restores_total": self.restores, "drop_fallbacks_total": self.fallbacks,
            "kv_bytes_exchanged_total": self.bytes_exchanged, "drop_merge_pause_seconds": self.merge_pause_seconds,
            "restore_seconds": self.restore_seconds, "restore_bytes_total": self.restore_bytes,
            "exchanged_requests_total": len(self.request_stalls),
            "exchange_stall_seconds_max": max(self.request_stalls, default=0.0),
            "exchange_stall_seconds_sum": sum(self.request_stalls),
            "exchange_overlapped_requests_total": self.overlapped_requests,
            "drop_detect_to_capacity_seconds": self.detect_to_capacity_seconds,
            "pipeline_groups": len(self.predicted_blocks),
            "drop_predicted_blocks": sum(self.predicted_blocks.values()),
        }
