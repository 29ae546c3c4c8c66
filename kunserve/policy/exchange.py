"""KV exchange planning: after a merge, which request's KV moves from which member to which.

A request's KV is spread over the members of the group it ran in, each holding the layers of
its old slice. After the merge each member of the new group needs the request's KV for its new
slice. Per (old member, new member) pair the overlap of the two layer ranges either stays
(same member: kept in place) or moves. Only peer-owned layers move: ``(g - 1) / g`` of a
request's KV when a single instance joins a group of ``g``.

Transfers are then cut into chunks of about one pipeline stage's compute time, so a chunk
never holds an activation transfer back for long (the mechanism sends activations first).
"""

from __future__ import annotations

import attrs

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
