"""Greedy drop planner: exact groups, stage assignment, and the one-full-copy invariant."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.policy.drop import DropPlan, GreedyDropPlanner, Group, WeightLayout, assign_stages, balanced_cuts

LAYOUT = WeightLayout(layer_bytes=(10,) * 8, embed_bytes=5, head_bytes=5)  # one copy = 90 bytes


def singles(n, layers=8):
    return [Group.single(i, layers) for i in range(n)]


def test_balanced_cuts():
    assert balanced_cuts(8, 2) == ((0, 4), (4, 8))
    assert balanced_cuts(8, 3) == ((0, 3), (3, 5), (5, 8))
    assert balanced_cuts(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))


def test_one_merge_when_one_copy_suffices():
    plan = GreedyDropPlanner(LAYOUT).plan(singles(4), required_bytes=90)
    assert plan.satisfied and plan.num_merges == 1
    assert plan.groups == (Group((0, 1), ((0, 4), (4, 8))), Group.single(2, 8), Group.single(3, 8))
    assert plan.freed_bytes == {0: 45, 1: 45}  # each keeps half the layers and one end


def test_smallest_groups_merge_first():
    plan = GreedyDropPlanner(LAYOUT).plan(singles(4), required_bytes=180)
    assert [g.members for g in plan.groups] == [(0, 1), (2, 3)]
    plan = GreedyDropPlanner(LAYOUT).plan(singles(4), required_bytes=270)
    assert plan.num_merges == 3 and [g.size for g in plan.groups] == [4]
    assert plan.sources == (tuple(singles(4)),) and plan.unchanged == ()
    assert plan.total_freed_bytes == 270 and plan.groups[0].members == (0, 1, 2, 3)


def test_overloaded_instances_merge_first_among_equal_sizes():
    plan = GreedyDropPlanner(LAYOUT).plan(singles(4), required_bytes=90, prefer=frozenset({3}))
    assert [g.members for g in plan.merged] == [(0, 3)]  # the overloaded one and the next in line
    plan = GreedyDropPlanner(LAYOUT).plan(singles(4), required_bytes=90, prefer=frozenset({1, 2}))
    assert [g.members for g in plan.merged] == [(1, 2)]


def test_merging_existing_groups_keeps_held_layers():
    """2 + 2 -> 4: every member's new stage lies inside the half it already holds."""
    a = Group((0, 1), ((0, 4), (4, 8)))
    b = Group((2, 3), ((0, 4), (4, 8)))
    plan = GreedyDropPlanner(LAYOUT).plan([a, b, Group.single(4, 8)], required_bytes=1)
    # the single (size 1) and a size-2 group are the two smallest: 1 + 2 -> 3
    assert plan.merged[0].members == (0, 4, 1)
    merged = assign_stages([a, b], 8)
    assert merged == Group((0, 2, 1, 3), ((0, 2), (2, 4), (4, 6), (6, 8)))
    plan = GreedyDropPlanner(LAYOUT).plan([a, b], required_bytes=1)
    assert plan.freed_bytes == {0: 20, 2: 25, 1: 25, 3: 20}  # ends keep embedding / head


def test_mixed_sizes_one_plus_two():
    single, pair = Group.single(7, 8), Group((1, 2), ((0, 4), (4, 8)))
    merged = assign_stages([single, pair], 8)
    assert merged == Group((1, 7, 2), ((0, 3), (3, 5), (5, 8)))  # 7 holds all, takes the middle


def test_unsatisfiable_plan_reports_failure_and_stops_at_layer_count():
    planner = GreedyDropPlanner(WeightLayout(layer_bytes=(10,) * 2))
    plan = planner.plan(singles(4, layers=2), required_bytes=10_000)
    assert not plan.satisfied
    assert [g.size for g in plan.groups] == [2, 2]  # a 4-stage pipeline of 2 layers is impossible
    assert plan.total_freed_bytes == 40


def test_no_requirement_no_merge():
    plan = GreedyDropPlanner(LAYOUT).plan(singles(3), required_bytes=0)
    assert plan.num_merges == 0 and plan.freed_bytes == {} and plan.satisfied


def _covers_once(group: Group, layers: int) -> bool:
    bounds = [r for s in group.slices for r in s]
    return group.slices[0][0] == 0 and group.slices[-1][1] == layers and all(
        group.slices[i][1] == group.slices[i + 1][0] for i in range(group.size - 1)
    ) and all(a < b for a, b in group.slices) and len(bounds) == 2 * group.size


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), layers=st.integers(1, 12), required=st.integers(0, 5000),
       max_size=st.one_of(st.none(), st.integers(1, 8)))
def test_every_plan_keeps_one_full_copy_per_group(n, layers, required, max_size):
    layout = WeightLayout(layer_bytes=(10,) * layers, embed_bytes=3, head_bytes=4)
    plan: DropPlan = GreedyDropPlanner(layout, max_size).plan(singles(n, layers), required)
    assert sorted(m for g in plan.groups for m in g.members) == list(range(n))
    for g in plan.groups:
        assert _covers_once(g, layers)
        assert g.size <= min(layers, max_size or layers)
    assert plan.total_freed_bytes == plan.num_merges * layout.total_bytes
    held_after = sum(layout.slice_bytes(s) for g in plan.groups for s in g.slices)
    assert held_after == len(plan.groups) * layout.total_bytes
    if not plan.satisfied:  # failure only when no further merge is allowed
        sizes = sorted(g.size for g in plan.groups)
        assert len(sizes) < 2 or sizes[0] + sizes[1] > min(layers, max_size or layers)


def _heap_reference(groups, layout, required, max_size, prefer=frozenset()):
    """The paper's greedy plan with a plain min-heap: pop the two smallest (size, then groups
    with a preferred member, then lowest id), merge while the requirement is not met."""
    import heapq

    limit = min(max_size or layout.num_layers, layout.num_layers)

    heap = [((g.size, prefer.isdisjoint(g.members), min(g.members)), (g,)) for g in groups]
    heapq.heapify(heap)
    freed, merges = 0, []
    while len(heap) >= 2 and freed < required:
        (ka, a), (kb, b) = heapq.heappop(heap), heapq.heappop(heap)
        if ka[0] + kb[0] > limit:
            heapq.heappush(heap, (ka, a))
            heapq.heappush(heap, (kb, b))
            break
        heapq.heappush(heap, ((ka[0] + kb[0], *min(ka[1:], kb[1:])), a + b))  # the lower (preference, id)
        freed += layout.total_bytes
    merged = sorted(tuple(m for g in parts for m in g.members) for _, parts in heap if len(parts) > 1)
    return merged, freed


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=60), required_copies=st.integers(0, 70),
       max_size=st.one_of(st.none(), st.integers(1, 8)), prefer=st.sets(st.integers(0, 80), max_size=10))
def test_bulk_merges_give_the_min_heap_plan(sizes, required_copies, max_size, prefer):
    # groups of mixed sizes (held layers as a merge left them), some preferred: the planner's
    # bulk runs and one-at-a-time merges together make exactly the min-heap's merges
    layers = 8
    groups, next_id = [], 0
    for size in sizes:
        members = tuple(range(next_id, next_id + size))
        next_id += size
        groups.append(Group(members, balanced_cuts(layers, size)))
    layout = WeightLayout(layer_bytes=(10,) * layers, embed_bytes=3, head_bytes=4)
    required = required_copies * layout.total_bytes
    plan = GreedyDropPlanner(layout, max_size).plan(groups, required, frozenset(prefer))
    expected, freed = _heap_reference(groups, layout, required, max_size, frozenset(prefer))
    got = sorted(tuple(m for g in parts for m in g.members) for parts in plan.sources)
    assert got == expected
    assert plan.total_freed_bytes == freed


def test_bulk_merges_at_scale_match_the_min_heap_plan():
    layout = WeightLayout(layer_bytes=(10,) * 48, embed_bytes=3, head_bytes=4)
    groups = singles(3000, 48)
    for copies in (0, 1, 299, 1500, 2625, 3000):
        plan = GreedyDropPlanner(layout, 8).plan(groups, copies * layout.total_bytes, frozenset(range(0, 3000, 7)))
        expected, _ = _heap_reference(groups, layout, copies * layout.total_bytes, 8, frozenset(range(0, 3000, 7)))
        assert sorted(tuple(m for g in parts for m in g.members) for parts in plan.sources) == expected


def test_bulk_merge_of_merged_entries_stops_where_the_initial_front_comes_first():
    from collections import deque

    from kunserve.policy import drop

    def entry(size, lowest):
        return ((size << drop._SIZE_SHIFT) | (1 << drop._PREF_SHIFT) | lowest, ())

    initial = [entry(2, 5)]
    # the merged front's first entry has a larger key than the initial front: the two-queue rule
    # takes the initial entry first, so no run may start here (its second entry's key is smaller)
    merged = deque([entry(2, 9), entry(2, 1), entry(2, 2), entry(2, 3)])
    assert drop._bulk_merged(initial, 0, merged, left=10, max_size=8) is None
    assert len(merged) == 4
    merged = deque([entry(2, 1), entry(2, 2), entry(2, 3), entry(2, 4), entry(2, 6), entry(2, 7)])
    assert drop._bulk_merged(initial, 0, merged, left=10, max_size=8) == (0, 2)  # stops before id 6
    assert [e[0] & drop._ID_MASK for e in merged] == [(1 << drop._PREF_SHIFT) | i for i in (6, 7, 1, 3)]
