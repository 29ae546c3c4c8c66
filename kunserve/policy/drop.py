"""Drop planning: which instances merge into pipeline groups, and who keeps which layers.

KunServe's greedy plan: groups start in a min-heap keyed by size; while two groups remain and
the freed bytes do not cover the requirement, pop the two smallest and merge them. The merged
group held two full weight copies and keeps one, so one copy's bytes are freed. Merging the
smallest groups first keeps pipelines short. O(N log N) for N instances.
"""

from __future__ import annotations

import bisect
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
    min-heap, O(N log N) for the sort and O(1) per merge; runs of merges that take both entries
    from one queue are made in bulk (``_bulk_initial``, ``_bulk_merged``; checked against a
    plain min-heap by the tests). Stages are assigned once per holdings pattern and reused for
    every final group of that pattern, from the members' holdings before the drop.
    """

    def __init__(self, layout: WeightLayout, max_group_size: int | None = None):
        self.layout = layout
        self.max_group_size = min(max_group_size or layout.num_layers, layout.num_layers)
        self._assignments: dict[tuple, tuple] = {}  # holdings pattern -> _assignment_for
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
        initial = _merge_order(groups, prefer)  # consumed from index `i` on (sorted by key)
        merged: deque = deque()
        too_big: list = []
        i, freed, copy_bytes, max_size = 0, 0, self.layout.total_bytes, self.max_group_size
        while len(initial) - i + len(merged) >= 2 and freed < required_bytes:
            # Runs of merges whose two entries come from one queue go in bulk (at 10^5 instances
            # almost all of them); the rest one at a time. Both give the two-queue order.
            left = -(-(required_bytes - freed) // copy_bytes)  # merges still needed
            bulk = _bulk_initial(initial, i, merged, left, max_size) or _bulk_merged(initial, i, merged, left, max_size)
            if bulk:
                i += bulk[0]
                freed += bulk[1] * copy_bytes
                continue
            # the two smallest entries (fronts of the two queues)
            if not merged or (i < len(initial) and initial[i][0] <= merged[0][0]):
                a, i = initial[i], i + 1
            else:
                a = merged.popleft()
            if not merged or (i < len(initial) and initial[i][0] <= merged[0][0]):
                b, i = initial[i], i + 1
            else:
                b = merged.popleft()
            size = (a[0] >> _SIZE_SHIFT) + (b[0] >> _SIZE_SHIFT)
            if size > max_size:
                too_big = [a, b]
                break  # the two smallest are too big to merge: nothing else can be merged
            merged.append(_pair(a, b))
            freed += copy_bytes  # two copies became one
        # Entries from `initial` were never merged; `merged` ones always were.
        sources = tuple(e[1] for e in merged) + tuple(e[1] for e in too_big if len(e[1]) > 1)
        unchanged = tuple(e[1][0] for e in initial[i:]) + tuple(e[1][0] for e in too_big if len(e[1]) == 1)
        new_groups, freed_bytes = [], {}
        for parts in sources:
            group, freed = self._merge(parts)
            new_groups.append(group)
            freed_bytes.update(freed)
        return DropPlan(tuple(new_groups), sources, unchanged, freed_bytes, required_bytes)

    def _merge(self, parts: tuple[Group, ...]) -> tuple[Group, dict[int, int]]:
        """The merged group and what each member frees. Groups built from the same holdings
        pattern get the same assignment, so it is computed once per pattern."""
        pattern = tuple([g.slices for g in parts])
        assignment = self._assignments.get(pattern)
        if assignment is None:
            assignment = self._assignments[pattern] = self._assignment_for(parts)
        order, deltas, cuts = assignment
        flat = [m for g in parts for m in g.members]  # the parts' members, in order
        return Group(tuple([flat[k] for k in order]), cuts), {flat[k]: delta for k, delta in deltas}

    def _assignment_for(self, parts: tuple[Group, ...]) -> tuple:
        """(the merged group's members as indices into the parts' members in order, (index,
        bytes freed) of members that free any, the group's stage cuts)."""
        offsets = list(itertools.accumulate((g.size for g in parts), initial=0))
        stages = self._stages_for(parts)
        order = tuple(offsets[gi] + mi for gi, mi, _ in stages)
        deltas = tuple((offsets[gi] + mi, delta) for gi, mi, delta in stages if delta)
        return order, deltas, self._cuts(len(order))

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


def _pair(a, b):
    """The queue entry of ``a`` and ``b`` merged: sizes add, the lower preference-and-id stays."""
    return (((a[0] >> _SIZE_SHIFT) + (b[0] >> _SIZE_SHIFT)) << _SIZE_SHIFT) | min(a[0] & _ID_MASK, b[0] & _ID_MASK), \
        a[1] + b[1]


def _bulk_initial(initial: list, i: int, merged: deque, left: int, max_size: int) -> tuple[int, int] | None:
    """Merge the next initial entries pairwise while the two-queue rule would take both of each
    pair from ``initial``: (entries used, merges) or None. With ``merged`` non-empty its front
    stays the same meanwhile (new entries go to its back), so every entry taken must have a key
    <= that front's; with ``merged`` empty the first pair's entry becomes the front. Pairs too
    big to merge are left to the one-at-a-time path (it stops there)."""
    if len(initial) - i < 4 or left < 2:
        return None
    if merged:
        front = merged[0][0]
    else:
        front = _pair(initial[i], initial[i + 1])[0]
    end = bisect.bisect_right(initial, front, lo=i, key=_key)  # entries with key <= front
    pairs = min((end - i) // 2, left)
    # sizes grow along `initial`, so a run's last pair is its largest: shorten the run until it fits
    while pairs >= 2 and (initial[i + 2 * pairs - 2][0] >> _SIZE_SHIFT) + (initial[i + 2 * pairs - 1][0] >> _SIZE_SHIFT) > max_size:
        pairs //= 2
    if pairs < 2:
        return None
    run = initial[i:i + 2 * pairs]
    merged.extend(_pairs(run))
    return 2 * pairs, pairs


def _bulk_merged(initial: list, i: int, merged: deque, left: int, max_size: int) -> tuple[int, int] | None:
    """Merge the entries now in ``merged`` pairwise from its front while the two-queue rule
    would take both of each pair from there (both keys below the initial front's) and the pair
    fits; the new entries go to its back, after them: (0, merges) or None."""
    limit = min(len(merged) // 2, left)
    if limit < 2:
        return None
    head = initial[i][0] if i < len(initial) else None
    pairs = 0  # pairs at the front that the rule takes from `merged` and that fit (sizes never fall along it)
    for a, b in itertools.islice(zip(*[iter(merged)] * 2), limit):
        if (head is not None and max(a[0], b[0]) >= head) or (a[0] >> _SIZE_SHIFT) + (b[0] >> _SIZE_SHIFT) > max_size:
            break
        pairs += 1
    if pairs < 2:
        return None
    run = [merged.popleft() for _ in range(2 * pairs)]
    merged.extend(_pairs(run))
    return 0, pairs


def _pairs(run: list) -> list:
    """``_pair`` of entries 0 and 1, 2 and 3, ... of ``run`` (inlined: 10^5 pairs at scale)."""
    shift, mask = _SIZE_SHIFT, _ID_MASK
    return [((((ka >> shift) + (kb >> shift)) << shift) | (ka & mask if ka & mask < kb & mask else kb & mask), ga + gb)
            for (ka, ga), (kb, gb) in zip(run[0::2], run[1::2])]


def _key(entry) -> int:
    return entry[0]


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

