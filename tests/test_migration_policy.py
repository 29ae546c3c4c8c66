"""The Llumnix-style migration planner: exact orders from hand-built snapshots."""

from __future__ import annotations

import pytest

from kunserve.policy.migration import MigrationCandidate, MigrationOrder, MigrationPlanner, MigrationRules
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot


def inst(i, free, running, waiting=0, queued=0, blocks=16):
    return InstanceSnapshot(instance_id=i, block_size=4, num_blocks=blocks, num_free_blocks=free,
                            num_running=running, num_waiting=waiting, queued_blocks=queued)


def cands(*specs):
    """(request id, blocks[, remaining tokens]) in admission order."""
    return tuple(MigrationCandidate(s[0], s[1], s[2] if len(s) > 2 else 20) for s in specs)


def test_overloaded_source_moves_its_smallest_request_to_the_freest_instance():
    # instance 0: 1 free block, a queue needing 4 -> freeness (1-4)/4 < 0; instance 1 empty.
    snap = ClusterSnapshot((inst(0, 1, 3, waiting=1, queued=4), inst(1, 16, 0)))
    candidates = {0: cands(("a", 5), ("b", 3), ("c", 6))}
    assert MigrationPlanner().plan(snap, candidates) == (MigrationOrder("b", 0, 1, 3),)


def test_ties_on_blocks_go_to_the_newest_request():
    snap = ClusterSnapshot((inst(0, 0, 3, waiting=2, queued=4), inst(1, 16, 0)))
    candidates = {0: cands(("a", 3), ("b", 3), ("c", 4))}
    assert MigrationPlanner().plan(snap, candidates) == (MigrationOrder("b", 0, 1, 3),)


def test_balanced_cluster_plans_nothing():
    snap = ClusterSnapshot((inst(0, 8, 2), inst(1, 9, 2)))
    candidates = {0: cands(("a", 4)), 1: cands(("b", 3))}
    assert MigrationPlanner().plan(snap, candidates) == ()


def test_destination_with_a_queue_or_low_freeness_is_not_used():
    snap = ClusterSnapshot((inst(0, 0, 3, waiting=1, queued=2), inst(1, 12, 1, waiting=1, queued=1),
                            inst(2, 3, 2)))  # 2: freeness 3/3 = 1 <= destination_above 2
    assert MigrationPlanner().plan(snap, {0: cands(("a", 2))}) == ()


def test_request_must_fit_with_headroom_and_not_be_about_to_finish():
    snap = ClusterSnapshot((inst(0, 0, 3, waiting=1, queued=2), inst(1, 6, 0)))
    # room at 1: 6 free - 0 queued - 1 headroom = 5 blocks
    candidates = {0: cands(("big", 6), ("ending", 2, 3), ("ok", 5))}
    assert MigrationPlanner().plan(snap, candidates) == (MigrationOrder("ok", 0, 1, 5),)
    assert MigrationPlanner().plan(snap, {0: cands(("big", 6), ("ending", 2, 3))}) == ()


def test_pairs_lowest_freeness_source_with_highest_freeness_destination():
    snap = ClusterSnapshot((
        inst(0, 0, 2, waiting=1, queued=1),   # freeness -1/3
        inst(1, 0, 1, waiting=1, queued=4),   # freeness -4/2 = -2: the most loaded
        inst(2, 10, 1),                       # 10/2 = 5
        inst(3, 16, 0),                       # 16/1 = 16: the freest
    ))
    candidates = {0: cands(("a", 2)), 1: cands(("b", 3))}
    assert MigrationPlanner().plan(snap, candidates) == (MigrationOrder("b", 1, 3, 3), MigrationOrder("a", 0, 2, 2))


def test_concurrency_is_bounded_and_busy_or_excluded_are_skipped():
    snap = ClusterSnapshot((inst(0, 0, 2, waiting=1, queued=1), inst(1, 0, 1, waiting=1, queued=4),
                            inst(2, 10, 1), inst(3, 16, 0)))
    candidates = {0: cands(("a", 2)), 1: cands(("b", 3), ("b2", 4))}
    planner = MigrationPlanner(MigrationRules(max_concurrent=2))
    assert planner.plan(snap, candidates, inflight=1) == (MigrationOrder("b", 1, 3, 3),)
    assert planner.plan(snap, candidates, inflight=2) == ()
    # instance 3 is already receiving: 1's request goes to 2, and 0 finds no destination left
    assert planner.plan(snap, candidates, busy=frozenset({3})) == (MigrationOrder("b", 1, 2, 3),)
    assert planner.plan(snap, candidates, exclude=frozenset({"b"}), busy=frozenset({0})) == (
        MigrationOrder("b2", 1, 3, 4),)


def test_source_without_candidates_leaves_the_destination_to_the_next_source():
    snap = ClusterSnapshot((inst(0, 0, 1, waiting=1, queued=4), inst(1, 0, 2, waiting=1, queued=1),
                            inst(2, 16, 0)))
    candidates = {0: cands(("prefilling-only", 20)), 1: cands(("x", 2))}  # 0's request does not fit
    assert MigrationPlanner().plan(snap, candidates) == (MigrationOrder("x", 1, 2, 2),)


@pytest.mark.parametrize("kwargs", [dict(source_below=2.0, destination_above=2.0), dict(max_concurrent=0),
                                    dict(headroom_blocks=-1), dict(min_remaining_tokens=0),
                                    dict(source_below=float("nan"))])
def test_rules_are_validated_once(kwargs):
    with pytest.raises(ValueError):
        MigrationRules(**kwargs)


def test_order_to_itself_is_rejected():
    with pytest.raises(ValueError, match="src == dst"):
        MigrationOrder("a", 1, 1, 2)
