"""Drop trigger and restore rules."""

from __future__ import annotations

import pytest

from kunserve.policy.overload import OverloadRules
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot


def inst(i, free, running, waiting, hol=0, queued=0, blocks=100):
    return InstanceSnapshot(i, 16, blocks, free, running, waiting, hol, queued)


def test_overload_needs_a_queue_and_demand_beyond_capacity():
    rules = OverloadRules()
    assert rules.is_overloaded(inst(0, free=2, running=5, waiting=3, hol=10, queued=30))
    assert not rules.is_overloaded(inst(0, free=2, running=5, waiting=0))  # nothing queued
    assert not rules.is_overloaded(inst(0, free=20, running=5, waiting=1, hol=10, queued=10))  # it fits


def test_required_bytes_counts_only_overloaded_instances():
    snap = ClusterSnapshot((
        inst(0, free=2, running=5, waiting=3, hol=10, queued=30),  # needs 28 more blocks
        inst(1, free=50, running=1, waiting=1, hol=5, queued=5),  # fine
        inst(2, free=0, running=9, waiting=2, hol=4, queued=6),  # needs 6
    ))
    assert OverloadRules().required_bytes(snap, block_bytes=1000) == 34_000


def test_restore_needs_low_use_and_hold_time():
    rules = OverloadRules(restore_fraction=0.5, min_hold_s=10)
    assert rules.should_restore(used_blocks=49, no_drop_capacity_blocks=100, dropped_at=0, now=10)
    assert not rules.should_restore(used_blocks=50, no_drop_capacity_blocks=100, dropped_at=0, now=10)
    assert not rules.should_restore(used_blocks=10, no_drop_capacity_blocks=100, dropped_at=0, now=9.9)


def test_bad_rule_values():
    with pytest.raises(ValueError, match=r"restore_fraction must be in \(0, 1\)"):
        OverloadRules(restore_fraction=1.0)
    with pytest.raises(ValueError, match="min_hold_s must be >= 0"):
        OverloadRules(min_hold_s=-1)
