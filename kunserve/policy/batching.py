"""Micro-batch formation for pipelined groups (issue 7): lookahead vs token budget.

Both batchers take the queued work as a list of ``ChunkWork`` — each the whole remaining piece
of one request, with the request's tokens already in the KV cache as its ``prefix`` — and
return micro-batches (tuples of ``ChunkWork``) in the order they enter the pipeline.

Invariants of every plan (checked by the tests):

* every queued token is scheduled exactly once: for each request the pieces tile
  ``[prefix, prefix + num_tokens)`` without gap or overlap;
* exact prefix accounting: a later piece's ``prefix`` is the earlier piece's ``prefix`` plus
  its ``num_tokens``;
* causality: pieces of one request appear in order across micro-batches, at most one piece per
  micro-batch. Micro-batch ``i`` enters every stage before ``i + 1``, so a piece's prefix KV is
  written (by an earlier micro-batch, or was already cached) before any layer reads it.

``LookaheadBatcher`` (KunServe): all queued work starts as one micro-batch, which is split
recursively into two halves of (near) equal *cost* under a fitted ``CostModel``. The work is
laid out as one token sequence (requests in queue order, each request's tokens in order) and a
cut is a position in it; a request straddling the cut is chunked there. The cost gap between
the halves never falls across chunk boundaries, so the balanced cut is found by a scan over
chunk boundaries and a bisection on the gap's sign inside the straddling chunk.

Splitting is level by level: every micro-batch of a level is halved, or none is. The recursion
stops at the first level where some micro-batch's balanced cut would leave a half below
``min_tokens`` (the profiled smallest batch that keeps the device busy). So a plan is 2^L
micro-batches of (near) equal cost, each of >= ``min_tokens`` tokens unless the whole queue
is smaller. Halving each micro-batch on its own until *it* reaches MIN would stop siblings at
different depths (equal cost, but the cheaper-per-token sibling holds more tokens and splits
once more), leaving leaves whose costs differ by 2x: exactly the imbalance that makes bubbles.

``TokenBudgetBatcher`` (Sarathi-style baseline): fill micro-batches in queue order up to
``max_tokens`` tokens, chunking the request at the boundary.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from kunserve.policy.cost_model import BatchShape, ChunkWork, CostModel

MicroBatch = tuple[ChunkWork, ...]


def _check_queue(work: Sequence[ChunkWork]) -> list[ChunkWork]:
    work = list(work)
    seen = set()
    for chunk in work:
        if not isinstance(chunk, ChunkWork):
            raise ValueError(f"queued work must be ChunkWork, got {type(chunk).__name__}")
        if chunk.request_id in seen:
            raise ValueError(f"request {chunk.request_id!r} is queued twice; pass its remaining "
                             f"tokens as one piece")
        seen.add(chunk.request_id)
    return work


def _min_tokens(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


@attrs.frozen
class LookaheadBatcher:
    """Balanced micro-batches by level-by-level equal-cost halving (see the module docstring)."""

    cost_model: CostModel = attrs.field(validator=attrs.validators.instance_of(CostModel))
    min_tokens: int = attrs.field(validator=_min_tokens)

    def form(self, work: Sequence[ChunkWork]) -> list[MicroBatch]:
        work = _check_queue(work)
        if not work:
            return []
        level = [tuple(work)]
        while True:
            halves = [self.split(batch) for batch in level]
            if any(pair is None for pair in halves):
                return level
            level = [half for pair in halves for half in pair]

    def decode_cost(self, context: int) -> float:
        """What one more decode over ``context`` tokens of KV adds to a batch: its chunk cost less
        the share ``λ`` every chunk after the first saves (the floor and the context term belong
        to the batch). An overlapped pipeline balances its request sets by it."""
        return self.cost_model.chunk_cost(ChunkWork("", max(0, context - 1), 1)) - self.cost_model.lam

    def split(self, batch: MicroBatch) -> tuple[MicroBatch, MicroBatch] | None:
        """The equal-cost halves of ``batch``, or None if a half would be below ``min_tokens``."""
        total = sum(c.num_tokens for c in batch)
        if total < 2 * self.min_tokens:
            return None
        cut = self._balanced_cut(batch, total)
        if min(cut, total - cut) < self.min_tokens:
            return None
        return cut_at(batch, cut)

    def _balanced_cut(self, batch: MicroBatch, total: int) -> int:
        """The token position in [1, total − 1] that best balances the halves' costs.

        gap(pos) = cost(left) − cost(right). At chunk boundaries it never falls: moving a whole
        chunk leftwards adds it to the left and takes it from the right, and a batch's cost
        never falls as chunks are added (λ ≤ d, the floor's slope ≤ f, the context term's max is
        of non-decreasing terms). Inside a chunk it need not be monotone (the right piece's
        prefix grows with the offset t: with a > 2b or g > 0 its cost can rise) nor, with the
        floor or the context term, convex. So: scan the boundaries for the first chunk whose end
        has gap ≥ 0 and bisect inside it on the sign of the gap. The bisection keeps gap(lo − 1)
        < 0 ≤ gap(hi), so it ends on a sign change: the cut found is within one token's step
        of zero whatever the gap's shape, and exact where the gap is monotone (a ≤ 2b, g = 0;
        both checked against brute force). Then keep the position closest to balance among both
        sides of the crossing and the chunk's ends (a first chunk whose first token already
        outweighs the rest, or a last one that outweighs everything before it, has no crossing).
        """
        m = self.cost_model
        shapes = [m.chunk_shape(c) for c in batch]
        after = [BatchShape()] * (len(batch) + 1)  # after[i]: chunks i, i + 1, ... together
        for i in reversed(range(len(batch))):
            after[i] = shapes[i] + after[i + 1]
        k, before, start = len(batch), BatchShape(), 0
        for i, chunk in enumerate(batch):
            through = before + shapes[i]  # chunks 0 .. i
            c = chunk.num_tokens if i < k - 1 else chunk.num_tokens - 1  # keep the right half non-empty

            def gap(t: int) -> float:  # the cut after t tokens of chunk i
                if t == 0:  # chunk boundaries
                    return m.shape_cost(before) - m.shape_cost(after[i])
                if t == chunk.num_tokens:
                    return m.shape_cost(through) - m.shape_cost(after[i + 1])
                head = ChunkWork(chunk.request_id, chunk.prefix, t)
                tail = ChunkWork(chunk.request_id, chunk.prefix + t, chunk.num_tokens - t)
                return m.shape_cost(before + m.chunk_shape(head)) - m.shape_cost(m.chunk_shape(tail) + after[i + 1])

            if c >= 1 and (i == k - 1 or gap(c) >= 0):
                lo, hi = 1, c
                while lo < hi:
                    mid = (lo + hi) // 2
                    if gap(mid) >= 0:
                        hi = mid
                    else:
                        lo = mid + 1
                candidates = sorted({t for t in (0, 1, lo - 1, lo, c) if 0 < start + t < total})
                return start + min(candidates, key=lambda t: abs(gap(t)))
            before, start = through, start + chunk.num_tokens
        return total - 1  # the last chunk is one token and still outweighs all the rest


def cut_at(batch: Sequence[ChunkWork], pos: int) -> tuple[MicroBatch, MicroBatch]:
    """Split ``batch``'s token sequence before token ``pos``; a straddling chunk becomes two
    pieces, the second starting where the first ends."""
    left: list[ChunkWork] = []
    seen = 0
    for i, chunk in enumerate(batch):
        if seen + chunk.num_tokens <= pos:
            left.append(chunk)
            seen += chunk.num_tokens
            continue
        take = pos - seen
        if take == 0:
            return tuple(left), tuple(batch[i:])
        head = ChunkWork(chunk.request_id, chunk.prefix, take)
        tail = ChunkWork(chunk.request_id, chunk.prefix + take, chunk.num_tokens - take)
        return tuple(left) + (head,), (tail,) + tuple(batch[i + 1:])
    return tuple(left), ()


@attrs.frozen
class TokenBudgetBatcher:
    """Micro-batches of ``max_tokens`` tokens in queue order (the last one may hold fewer)."""

    max_tokens: int = attrs.field(validator=_min_tokens)

    def form(self, work: Sequence[ChunkWork]) -> list[MicroBatch]:
        out: list[MicroBatch] = []
        current: list[ChunkWork] = []
        room = self.max_tokens
        for chunk in _check_queue(work):
            while chunk is not None:
                take = min(room, chunk.num_tokens)
                current.append(ChunkWork(chunk.request_id, chunk.prefix, take))
                room -= take
                rest = chunk.num_tokens - take
                chunk = ChunkWork(chunk.request_id, chunk.prefix + take, rest) if rest else None
                if room == 0:
                    out.append(tuple(current))
                    current, room = [], self.max_tokens
        if current:
            out.append(tuple(current))
        return out


BATCHERS = ("lookahead", "token-budget")


def make_batcher(name: str, *, cost_model: CostModel | None = None, min_tokens: int | None = None,
                 max_tokens: int | None = None) -> LookaheadBatcher | TokenBudgetBatcher:
    """The batcher called ``name``: "lookahead" needs ``cost_model`` and ``min_tokens``,
    "token-budget" needs ``max_tokens``."""
    if name == "lookahead":
        if cost_model is None or min_tokens is None:
            raise ValueError("the lookahead batcher needs cost_model and min_tokens "
                             "(both come from a profile: kunserve.policy.cost_model.Profile.from_json)")
        return LookaheadBatcher(cost_model, min_tokens)
    if name == "token-budget":
        if max_tokens is None:
            raise ValueError("the token-budget batcher needs max_tokens")
        return TokenBudgetBatcher(max_tokens)
    raise ValueError(f"unknown batcher {name!r}; choose from {list(BATCHERS)}")
