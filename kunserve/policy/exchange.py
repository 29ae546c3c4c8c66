"""KV exchange planning: after a merge, which request's KV moves from which member to which.

A request's KV is spread over the members of the group it ran in, each holding the layers of
its old slice. After the merge each member of the new group needs the request's KV for its new
slice. Per (old member, new member) pair the overlap of the two layer ranges either stays
(same member: kept in place) or moves. Only peer-owned layers move: ``(g - 1) / g`` of a
request's KV when a single instance joins a group of ``g``.

Transfers are then cut into chunks of about one pipeline stage's compute time, so a chunk
never holds an activation transfer back for long (the mechanism sends activations first).

``schedule_exchange`` turns the page counts of every (request, source, destination) into
*rounds*: the group runs one round after each pipeline step, each link carries at most one
chunk per round, and a request becomes runnable after the round that delivers its last chunk.
Because the schedule is known up front, the leader can compute exactly how many pages every
member will hold after each round and admit queued requests only into memory that stays free
on every member for the rest of the exchange (``ExchangeSchedule.admission_budget``).
"""

from __future__ import annotations

import attrs

from collections import defaultdict

from kunserve.policy.drop import Group, LayerRange


@attrs.frozen
class ResidentRequest:
    """A running request as one old member holds it: its page ids for its old slice."""

    request_id: str
    member: int
    num_tokens: int
    pages: tuple[int, ...]


@attrs.frozen
class KVTransfer:
    request_id: str
    src: int
    dst: int
    layers: LayerRange
    src_pages: tuple[int, ...]  # pages (in the source's old layout) holding the data
    num_tokens: int

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@attrs.frozen
class ExchangePlan:
    transfers: tuple[KVTransfer, ...]
    kept: tuple[KVTransfer, ...]  # src == dst: stays on the member

    def bytes_moved(self, bytes_per_token_layer: int) -> int:
        return sum(t.num_tokens * t.num_layers for t in self.transfers) * bytes_per_token_layer


def _overlap(a: LayerRange, b: LayerRange) -> LayerRange | None:
    first, last = max(a[0], b[0]), min(a[1], b[1])
    return (first, last) if first < last else None


def plan_exchange(sources: tuple[Group, ...], merged: Group, residents: list[ResidentRequest]) -> ExchangePlan:
    """Transfers that give every member of ``merged`` its layers of every resident request.

    ``residents`` lists, for each old member, the requests it holds KV for (a request of an old
    group appears once per member of that group).
    """
    old_slice = {m: s for g in sources for m, s in zip(g.members, g.slices)}
    moves, kept = [], []
    for r in residents:
        for dst, new_slice in zip(merged.members, merged.slices):
            layers = _overlap(old_slice[r.member], new_slice)
            if layers is None:
                continue
            transfer = KVTransfer(r.request_id, r.member, dst, layers, r.pages, r.num_tokens)
            (kept if dst == r.member else moves).append(transfer)
    return ExchangePlan(tuple(moves), tuple(kept))


def chunk_transfers(
    transfers: tuple[KVTransfer, ...], block_size: int, bytes_per_token_layer: int, chunk_bytes: int
) -> list[KVTransfer]:
    """Split transfers page-wise so no chunk exceeds ``chunk_bytes`` (a chunk holds at least one
    page). ``chunk_bytes`` is about link bandwidth x one stage's compute time."""
    chunks = []
    for t in transfers:
        page_bytes = block_size * t.num_layers * bytes_per_token_layer
        per_chunk = max(1, chunk_bytes // page_bytes)
        for start in range(0, len(t.src_pages), per_chunk):
            pages = t.src_pages[start:start + per_chunk]
            tokens = min(t.num_tokens - start * block_size, len(pages) * block_size)
            chunks.append(attrs.evolve(t, src_pages=pages, num_tokens=tokens))
    return chunks


@attrs.frozen
class PageTransfer:
    """``num_pages`` pages (new layout) of one request that ``src`` sends to ``dst``."""

    request_id: str
    src: int
    dst: int
    num_pages: int


@attrs.frozen
class ExchangeSchedule:
    """Rounds of an exchange and what the leader needs to admit safely meanwhile.

    ``rounds[k]`` are the pieces sent in round ``k`` (per link at most ``chunk_pages`` pages, in
    request order, so a request's pages arrive in table order). ``ready_after[r]`` is the round
    after which every member holds request ``r``'s KV (-1: nothing moves, runnable at once).
    State ``k`` is "before round ``k``" (state ``len(rounds)``: exchange done); ``held[k][m]`` is
    what member ``m`` then holds for the exchanged requests and ``admission_budget[k]`` the pages
    still free on every member in every later state, which is what newly admitted work may use.
    """

    rounds: tuple[tuple[PageTransfer, ...], ...]
    ready_after: dict[str, int]
    held: tuple[dict[int, int], ...]
    admission_budget: tuple[int, ...]

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    def ready_in_round(self, k: int) -> list[str]:
        return [r for r, last in self.ready_after.items() if last == k]


def schedule_exchange(
    transfers: list[PageTransfer], held: dict[int, int], pool: dict[int, int], chunk_pages: int
) -> ExchangeSchedule:
    """Rounds for ``transfers`` (in the order given: requests in arrival order), at most
    ``chunk_pages`` per link per round. ``held[m]``: pages member ``m`` holds for the exchanged
    requests before the exchange (kept + outbound); ``pool[m]``: its KV pages in all.

    Invariant the budget relies on: within a round a member first frees what it sends (data
    is staged out of the pool), then allocates what it receives, so its peak is the larger of
    the states before and after the round."""
    if chunk_pages < 1:
        raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
    links: dict[tuple[int, int], list[list]] = defaultdict(list)  # link -> [request, pages left]
    for t in transfers:
        if t.src == t.dst or t.num_pages < 1:
            raise ValueError(f"transfer {t} must move >= 1 page between two members")
        links[(t.src, t.dst)].append([t.request_id, t.num_pages])
    rounds, ready_after = [], {t.request_id: -1 for t in transfers}
    while any(links.values()):
        pieces = []
        for (src, dst), queue in sorted(links.items()):
            room = chunk_pages
            while queue and room:
                request_id, left = queue[0]
                n = min(left, room)
                pieces.append(PageTransfer(request_id, src, dst, n))
                ready_after[request_id] = len(rounds)
                room -= n
                if n == left:
                    queue.pop(0)
                else:
                    queue[0][1] -= n
        rounds.append(tuple(pieces))
    states = [dict(held)]
    for pieces in rounds:
        state = dict(states[-1])
        for p in pieces:
            state[p.src] -= p.num_pages
            state[p.dst] = state.get(p.dst, 0) + p.num_pages
        states.append(state)
    budget, best = [], None
    for state in reversed(states):  # suffix minimum: admitted work must fit in every later state
        free_now = min(pool[m] - state.get(m, 0) for m in pool)
        best = free_now if best is None else min(best, free_now)
        budget.append(best)
    return ExchangeSchedule(tuple(rounds), ready_after, tuple(states), tuple(reversed(budget)))


def assign_owners(running, waiting, members: tuple[int, ...], blocks_of) -> dict[str, int]:
    """Who serves each request when a group splits: running requests in arrival order to the
    member holding the fewest KV blocks so far (``blocks_of(request_id)`` each), queued ones
    round-robin. ``running`` / ``waiting``: objects with ``request_id`` and ``metrics.arrival_time``."""
    load, owner = {m: 0 for m in members}, {}
    for request in sorted(running, key=lambda r: r.metrics.arrival_time):
        target = min(members, key=lambda m: (load[m], m))
        owner[request.request_id] = target
        load[target] += blocks_of(request.request_id)
    for i, request in enumerate(waiting):
        owner[request.request_id] = members[i % len(members)]
    return owner
