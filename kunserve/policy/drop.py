"""Drop planning: which instances merge into pipeline groups, and who keeps which layers.

KunServe's greedy plan: groups start in a min-heap keyed by size; while two groups remain and
the freed bytes do not cover the requirement, pop the two smallest and merge them. The merged
group held two full weight copies and keeps one, so one copy's bytes are freed. Merging the
smallest groups first keeps pipelines short. O(N log N) for N instances.
"""

from __future__ import annotations

import gc
import itertools
from collections import deque

import attrs

LayerRange = tuple[int, int]


@attrs.frozen
class WeightLayout:
    """Bytes of each part of one full weight copy; the first stage holds the embedding and the
    last stage the final norm + lm_head (tied models count the embedding in ``head_bytes``)."""

    layer_bytes: tuple[int, ...] = attrs.field(converter=tuple)
    embed_bytes: int = 0
    head_bytes: int = 0
    _prefix: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self):
        if not self.layer_bytes:
            raise ValueError("a weight layout needs at least one layer")
        object.__setattr__(self, "_prefix", (0, *itertools.accumulate(self.layer_bytes)))

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return self._prefix[-1] + self.embed_bytes + self.head_bytes

    def slice_bytes(self, layers: LayerRange) -> int:
        first, last = layers
        return (
            self._prefix[last] - self._prefix[first]
            + (self.embed_bytes if first == 0 else 0)
            + (self.head_bytes if last == self.num_layers else 0)
        )


@attrs.frozen
class Group:
    """A pipeline of instances. Invariant: ``slices`` are contiguous, in pipeline order, and
    together cover ``[0, num_layers)`` exactly once: the group holds one full copy."""

    members: tuple[int, ...]
    slices: tuple[LayerRange, ...]

    @classmethod
    def single(cls, instance_id: int, num_layers: int) -> "Group":
        return cls((instance_id,), ((0, num_layers),))

    @property
    def size(self) -> int:
        return len(self.members)

    def slice_of(self, instance_id: int) -> LayerRange:
        return self.slices[self.members.index(instance_id)]


@attrs.frozen
class DropPlan:
    """Result of planning. ``merged[k]`` is a new group formed from the groups ``sources[k]``;
    ``unchanged`` are the groups left as they were. ``freed_bytes[i]`` is weight memory
    instance ``i`` releases to its KV cache; ``satisfied`` is False when no plan frees
    ``required_bytes`` (the caller falls back to KV-centric handling and should scale out)."""

    merged: tuple[Group, ...]
    sources: tuple[tuple[Group, ...], ...]
    unchanged: tuple[Group, ...]
    freed_bytes: dict[int, int]
    required_bytes: int

    @property
    def groups(self) -> tuple[Group, ...]:
        """Every group after the drop, ordered by lowest member id."""
        return tuple(sorted(self.merged + self.unchanged, key=lambda g: min(g.members)))

    @property
    def num_merges(self) -> int:
        return sum(len(s) - 1 for s in self.sources)

    @property
    def total_freed_bytes(self) -> int:
        return sum(self.freed_bytes.values())

    @property
    def satisfied(self) -> bool:
        return self.total_freed_bytes >= self.required_bytes


def balanced_cuts(num_layers: int, size: int) -> tuple[LayerRange, ...]:
    """``size`` contiguous slices of near-equal layer count covering ``[0, num_layers)``."""
    bounds = [round(k * num_layers / size) for k in range(size + 1)]
    return tuple(zip(bounds[:-1], bounds[1:]))


def assign_stages(sources: list[Group], num_layers: int) -> Group:
    """Give each member of the merged group one new stage, inside what it already holds when
    possible, so the drop needs no weight transfer. Stages go left to right; among the free
    members holding the stage, the one whose holding ends first takes it (interval matching).
    A stage no free member holds goes to the free member with the largest overlap (that member
    then pulls the missing layers from a peer)."""
    holdings = {m: s for g in sources for m, s in zip(g.members, g.slices)}
    free = set(holdings)
    members = []
    for first, last in balanced_cuts(num_layers, len(holdings)):
        holders = [m for m in free if holdings[m][0] <= first and last <= holdings[m][1]]
        if holders:
            chosen = min(holders, key=lambda m: (holdings[m][1], m))
        else:
            overlap = lambda m: min(last, holdings[m][1]) - max(first, holdings[m][0])  # noqa: E731
            chosen = max(sorted(free), key=overlap)
        free.remove(chosen)
        members.append(chosen)
    return Group(tuple(members), balanced_cuts(num_layers, len(members)))


class GreedyDropPlanner:
    """The paper's greedy smallest-two merge. Groups never exceed ``num_layers`` members (each
    stage needs at least one layer) nor ``max_group_size``.

    Merged sizes never decrease over time (as in Huffman coding), so instead of a heap the
    planner keeps two FIFO queues, the initial groups sorted by (size, preference, lowest id) and the merged
    groups in creation order; the two smallest are always at their fronts. Same result as the
    min-heap, O(N log N) for the sort and O(1) per merge. Stages are assigned once per final
    group, from the members' holdings before the drop.
    """

    def __init__(self, layout: WeightLayout, max_group_size: int | None = None):
        self.layout = layout
        self.max_group_size = min(max_group_size or layout.num_layers, layout.num_layers)
        self._assignments: dict[tuple, list[tuple[int, int, int]]] = {}
        self._cuts_by_size: dict[int, tuple[LayerRange, ...]] = {}

    def plan(self, groups: list[Group], required_bytes: int, prefer: frozenset[int] = frozenset()) -> DropPlan:
        """``prefer``: instances (e.g. the overloaded ones) that merge first among groups of equal
        size, so the memory is freed where the queue is."""
        # The planner allocates many small tuples and no cycles; generational GC passes over
        # them would make planning at 10^5 instances superlinear.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._plan(groups, required_bytes, prefer)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _plan(self, groups: list[Group], required_bytes: int, prefer: frozenset[int]) -> DropPlan:
        initial = deque(_merge_order(groups, prefer))
        merged: deque = deque()
        too_big: list = []
        freed, copy_bytes, max_size = 0, self.layout.total_bytes, self.max_group_size
        while len(initial) + len(merged) >= 2 and freed < required_bytes:
            # the two smallest entries (inlined: this loop runs once per merge, 10^5 times)
            a = initial.popleft() if not merged or (initial and initial[0][0] <= merged[0][0]) else merged.popleft()
            b = initial.popleft() if not merged or (initial and initial[0][0] <= merged[0][0]) else merged.popleft()
            size = (a[0] >> _SIZE_SHIFT) + (b[0] >> _SIZE_SHIFT)
            if size > max_size:
                too_big = [a, b]
                break  # the two smallest are too big to merge: nothing else can be merged
            merged.append(((size << _SIZE_SHIFT) | min(a[0] & _ID_MASK, b[0] & _ID_MASK), a[1] + b[1]))
            freed += copy_bytes  # two copies became one
        # Entries from `initial` were never merged; `merged` ones always were.
        sources = tuple(e[1] for e in merged) + tuple(e[1] for e in too_big if len(e[1]) > 1)
        unchanged = tuple(e[1][0] for e in initial) + tuple(e[1][0] for e in too_big if len(e[1]) == 1)
        new_groups, freed_bytes = [], {}
        for parts in sources:
            group, freed = self._merge(parts)
            new_groups.append(group)
            freed_bytes.update(freed)
        return DropPlan(tuple(new_groups), sources, unchanged, freed_bytes, required_bytes)

    def _merge(self, parts: tuple[Group, ...]) -> tuple[Group, dict[int, int]]:
        """The merged group and what each member frees. Groups built from the same holdings
        pattern get the same assignment, so it is computed once per pattern."""
        pattern = tuple(g.slices for g in parts)
        stages = self._assignments.get(pattern)
        if stages is None:
            stages = self._assignments[pattern] = self._stages_for(parts)
        members = tuple(parts[gi].members[mi] for gi, mi, _ in stages)
        freed = {parts[gi].members[mi]: delta for gi, mi, delta in stages if delta}
        return Group(members, self._cuts(len(members))), freed

    def _cuts(self, size: int) -> tuple[LayerRange, ...]:
        cuts = self._cuts_by_size.get(size)
        if cuts is None:
            cuts = self._cuts_by_size[size] = balanced_cuts(self.layout.num_layers, size)
        return cuts

    def _stages_for(self, parts: tuple[Group, ...]) -> list[tuple[int, int, int]]:
        """(source index, member index, bytes freed) of each stage of the merged group."""
        position = {m: (gi, mi) for gi, g in enumerate(parts) for mi, m in enumerate(g.members)}
        merged = assign_stages(list(parts), self.layout.num_layers)
        stages = []
        for member, new_slice in zip(merged.members, merged.slices):
            gi, mi = position[member]
            old_slice = parts[gi].slices[mi]
            stages.append((gi, mi, self.layout.slice_bytes(old_slice) - self.layout.slice_bytes(new_slice)))
        return stages


# A queue entry is ``(key, groups)`` with one int key, so the queues compare ints only:
# key = size << _SIZE_SHIFT | (not preferred) << _PREF_SHIFT | lowest member id.
_PREF_SHIFT, _SIZE_SHIFT = 48, 50
_ID_MASK = (1 << _SIZE_SHIFT) - 1  # the preference bit and the id: what a merged entry keeps the lower of


def _merge_order(groups: list[Group], prefer: frozenset[int]) -> list:
    """Queue entries ``(key, (group,))`` of the initial groups, in merge order: by size, then
    groups with a preferred member, then lowest id. Keys are unique, so sorting never compares
    the group part."""
    not_preferred = 1 << _PREF_SHIFT
    if prefer:
        entries = [((len(g.members) << _SIZE_SHIFT)
                    | (0 if not prefer.isdisjoint(g.members) else not_preferred) | min(g.members), (g,))
                   for g in groups]
    else:
        entries = [((len(g.members) << _SIZE_SHIFT) | not_preferred | min(g.members), (g,)) for g in groups]
    entries.sort()
    return entries

