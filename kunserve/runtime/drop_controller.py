"""Rank 0's drop trigger: turns overload in the cluster snapshot into merge orders.

Decisions come from the policies (``OverloadRules`` says when and how much, the greedy planner
says who merges with whom); this object only keeps the state between steps (which instances
are already grouped, whether a fallback was already reported) and the counters for /metrics.
"""

from __future__ import annotations

import logging
import time

from kunserve.policy.drop import GreedyDropPlanner, Group, WeightLayout
from kunserve.policy.overload import OverloadRules
from kunserve.policy.snapshot import ClusterSnapshot
from kunserve.runtime.regroup import MergeOrder, SplitOrder

log = logging.getLogger(__name__)


def weight_layout_of(memory, num_layers: int) -> WeightLayout:
    """Bytes each weight unit frees when dropped: its chunk, rounded up to the granularity."""
    granularity = memory.unified.backend.granularity
    chunk = {u: -(-n // granularity) * granularity for u, n in memory.placement.unit_bytes.items()}
    return WeightLayout(tuple(chunk[i] for i in range(num_layers)), chunk.get("embed", 0), chunk.get("head", 0))


class DropController:
    """Invariant: ``groups`` holds every live group (leader -> its merge order and time); only
    single instances are planned (merging existing groups is not done yet)."""

    def __init__(self, layout: WeightLayout, full_block_bytes: int, kv_mapped_bytes: int,
                 rules: OverloadRules | None = None, max_group_size: int | None = None):
        self.layout, self.full_block_bytes, self.kv_mapped_bytes = layout, full_block_bytes, kv_mapped_bytes
        self.planner = GreedyDropPlanner(layout, max_group_size)
        self.rules = rules or OverloadRules()
        self.drops = self.restores = self.fallbacks = self.bytes_exchanged = 0
        self.groups: dict[int, tuple[MergeOrder, float]] = {}  # leader -> (order, merge time)
        self.stall_seconds = 0.0
        self.detect_to_capacity_seconds = 0.0  # overload seen -> merged group's blocks admissible
        self._detected_at: float | None = None
        self.predicted_blocks: dict[int, int] = {}  # group leader -> planner-predicted capacity
        self._reported_fallback = False

    @property
    def grouped(self) -> set[int]:
        """Instances that are members of a live group."""
        return {rank for order, _ in self.groups.values() for rank in order.ranks}

    def plan(self, snapshot: ClusterSnapshot) -> list[MergeOrder]:
        if not any(self.rules.is_overloaded(i) for i in snapshot.instances):
            self._reported_fallback = False
            return []
        required = self.rules.required_bytes(snapshot, self.full_block_bytes)
        grouped = self.grouped
        singles = [Group.single(i.instance_id, self.layout.num_layers)
                   for i in snapshot.instances if i.instance_id not in grouped]
        overloaded = frozenset(i.instance_id for i in snapshot.instances if self.rules.is_overloaded(i))
        plan = self.planner.plan(singles, required, prefer=overloaded)
        if not plan.satisfied and not self._reported_fallback:
            self._reported_fallback = True
            self.fallbacks += 1
            log.warning("overload needs %d bytes of KV but dropping frees at most %d: falling back to "
                        "recompute preemption; the cluster needs more instances", required, plan.total_freed_bytes)
        if plan.merged:
            self._detected_at = time.monotonic()
        for group in plan.merged:
            self.groups[group.members[0]] = (MergeOrder(group.members, group.slices), time.monotonic())
            self.predicted_blocks[group.members[0]] = self._predicted_capacity(group, plan.freed_bytes)
            log.info("drop: instances %s merge into a pipeline with slices %s (predicted capacity %d blocks)",
                     group.members, group.slices, self.predicted_blocks[group.members[0]])
        return [MergeOrder(g.members, g.slices) for g in plan.merged]

    def plan_restore(self, snapshot: ClusterSnapshot) -> list[SplitOrder]:
        """Groups whose KV use fell under the restore fraction of their no-drop capacity."""
        orders, now = [], time.monotonic()
        no_drop_blocks = self.kv_mapped_bytes // self.full_block_bytes
        for leader, (order, merged_at) in self.groups.items():
            instance = snapshot.by_id(leader)
            capacity = no_drop_blocks * len(order.ranks)
            if self.rules.should_restore(instance.used_blocks + instance.queued_blocks, capacity, merged_at, now):
                orders.append(SplitOrder(order.ranks, order.slices))
                log.info("restore: group %s uses %d of %d no-drop blocks; splitting", order.ranks,
                         instance.used_blocks, capacity)
        return orders

    def restored(self, order: SplitOrder) -> None:
        self.groups.pop(order.ranks[0], None)
        self.predicted_blocks.pop(order.ranks[0], None)
        self.restores += 1

    def _predicted_capacity(self, group: Group, freed: dict[int, int]) -> int:
        """Blocks the group can hold: the smallest member's KV bytes over its new block size."""
        per_layer = self.full_block_bytes // self.layout.num_layers
        return min((self.kv_mapped_bytes + freed.get(m, 0)) // (per_layer * (b - a))
                   for m, (a, b) in zip(group.members, group.slices))

    def record(self, bytes_sent: int, seconds: float) -> None:
        self.bytes_exchanged += bytes_sent
        self.stall_seconds = max(self.stall_seconds, seconds)

    def merged(self) -> None:
        """The merge step finished: the queued requests are admitted from the next step on."""
        self.drops += 1
        if self._detected_at is not None:
            self.detect_to_capacity_seconds = max(self.detect_to_capacity_seconds, time.monotonic() - self._detected_at)

    def metrics(self) -> dict:
        return {
            "drops_total": self.drops, "restores_total": self.restores, "drop_fallbacks_total": self.fallbacks,
            "kv_bytes_exchanged_total": self.bytes_exchanged, "drop_stall_seconds": self.stall_seconds,
            "drop_detect_to_capacity_seconds": self.detect_to_capacity_seconds,
            "pipeline_groups": len(self.predicted_blocks),
            "drop_predicted_blocks": sum(self.predicted_blocks.values()),
        }
