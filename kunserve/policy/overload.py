"""When to drop and when to restore: rules over the cluster snapshot, with hysteresis.

Overload (drop trigger): some instance's memory demand (KV held + head-of-line queued request)
exceeds its capacity while requests are queued. The bytes to free are what the queued requests
of the overloaded instances need beyond their free blocks.
Restore: a group's KV use is below ``restore_fraction`` (50%) of what its members could hold
without dropping, and the drop is at least ``min_hold_s`` old. After a restore the split
instances hold under half their capacity, so demand must more than double before the next drop:
with the hold time, the rules cannot oscillate.
"""

from __future__ import annotations

import attrs

from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot


@attrs.frozen
class OverloadRules:
    restore_fraction: float = attrs.field(default=0.5)
    min_hold_s: float = attrs.field(default=5.0)

    @restore_fraction.validator
    def _check_fraction(self, _attr, value):
        if not 0 < value < 1:
            raise ValueError(f"restore_fraction must be in (0, 1), got {value}")

    @min_hold_s.validator
    def _check_hold(self, _attr, value):
        if value < 0:
            raise ValueError(f"min_hold_s must be >= 0, got {value}")

    @staticmethod
    def is_overloaded(instance: InstanceSnapshot) -> bool:
        return instance.num_waiting > 0 and instance.memory_demand_blocks > instance.num_blocks

    def required_bytes(self, snapshot: ClusterSnapshot, block_bytes: int) -> int:
        """KV bytes the queued requests of overloaded instances need beyond their free blocks."""
        missing = sum(
            max(0, i.queued_blocks - i.num_free_blocks)
            for i in snapshot.instances
            if self.is_overloaded(i)
        )
        return missing * block_bytes

    def should_restore(self, used_blocks: int, no_drop_capacity_blocks: int, dropped_at: float, now: float) -> bool:
        """``used_blocks`` and the capacity are counted in full-model (no-drop) blocks."""
        held_long_enough = now - dropped_at >= self.min_hold_s
        return held_long_enough and used_blocks < self.restore_fraction * no_drop_capacity_blocks
