"""Llumnix-style live migration: which running request moves from which instance to which.

Llumnix (OSDI'24) balances load after dispatch by migrating running requests' KV between
instances while they keep decoding. The decision is here; the copy is
``kunserve/runtime/migration.py``. The planner reads the same freeness as dispatch
(``policy/dispatch.freeness``: free blocks per running request after queued demand) and:

- a **source** is an instance whose freeness is below ``rules.source_below`` (its queue needs
  more blocks than are free, or it is about to preempt);
- a **destination** has no queue, freeness above ``rules.destination_above`` and room for the
  request plus ``rules.headroom_blocks``;
- sources are paired lowest freeness first with destinations highest freeness first (ties: the
  lower instance id), like Llumnix's pairing of the most and least loaded instances;
- from each source it moves the running request holding the **fewest KV blocks** (the shortest
  copy, Llumnix's choice), ties going to the newest: the scheduler would preempt it first.

Bounds: an instance takes part in at most one migration at a time (as source or destination;
the mechanism's per-pair handshake relies on it), at most ``rules.max_concurrent`` migrations
run in the cluster, and a request migrates at most once (``exclude``), so it cannot ping-pong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

from kunserve.policy.dispatch import freeness
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot


def _finite(instance, attribute, value) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be finite, got {value}")


@attrs.frozen(kw_only=True)
class MigrationRules:
    """When an instance migrates out or in, and how much may run at once.

    Invariant (checked once here): ``destination_above > source_below``, so a move never makes
    the destination a source at the same freeness; the gap is the hysteresis.
    """

    source_below: float = attrs.field(default=0.5, validator=_finite)
    destination_above: float = attrs.field(default=2.0, validator=_finite)
    headroom_blocks: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    min_remaining_tokens: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    max_concurrent: int = attrs.field(default=2, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self):
        if self.destination_above <= self.source_below:
            raise ValueError(f"destination_above ({self.destination_above}) must exceed "
                             f"source_below ({self.source_below})")


@attrs.frozen
class MigrationCandidate:
    """A running, decoding request as its instance reports it (before the step's forward).

    ``remaining_tokens``: tokens it may still generate (``max_tokens`` / ``max_model_len``);
    a request about to finish is not worth a copy."""

    request_id: str
    num_blocks: int
    remaining_tokens: int


@attrs.frozen
class MigrationOrder:
    """Move ``request_id`` (holding ``num_blocks`` when planned) from instance ``src`` to ``dst``."""

    request_id: str
    src: int
    dst: int
    num_blocks: int

    def __attrs_post_init__(self):
        if self.src == self.dst:
            raise ValueError(f"migration of {self.request_id} has src == dst == {self.src}")


class MigrationPlanner:
    """Pure decision: snapshot + candidates in, migration orders out (no tensors, no groups)."""

    def __init__(self, rules: MigrationRules | None = None):
        self.rules = rules or MigrationRules()

    def plan(self, snapshot: ClusterSnapshot, candidates: Mapping[int, Sequence[MigrationCandidate]],
             busy: frozenset[int] = frozenset(), exclude: frozenset[str] = frozenset(),
             inflight: int = 0) -> tuple[MigrationOrder, ...]:
        """Orders to start now. ``busy``: instances already in a migration; ``exclude``: request
        ids that must not move (already migrating or migrated); ``inflight``: migrations running.
        ``candidates[i]`` lists instance ``i``'s running requests in admission order."""
        rules = self.rules
        budget = rules.max_concurrent - inflight
        free = [i for i in snapshot.instances if i.instance_id not in busy]
        sources = sorted((i for i in free if freeness(i) < rules.source_below),
                         key=lambda i: (freeness(i), i.instance_id))
        destinations = sorted((i for i in free if i.num_waiting == 0 and freeness(i) > rules.destination_above),
                              key=lambda i: (-freeness(i), i.instance_id))
        orders: list[MigrationOrder] = []
        for src in sources:
            if budget <= len(orders) or not destinations:
                break
            for dst in destinations:
                choice = self._pick(candidates.get(src.instance_id, ()), dst, exclude)
                if choice is not None:
                    orders.append(MigrationOrder(choice.request_id, src.instance_id, dst.instance_id,
                                                 choice.num_blocks))
                    destinations.remove(dst)  # one migration per destination at a time
                    break
        return tuple(orders)

    def _pick(self, candidates: Sequence[MigrationCandidate], dst: InstanceSnapshot,
              exclude: frozenset[str]) -> MigrationCandidate | None:
        """The fewest-blocks candidate that fits ``dst``; ties go to the newest (listed last)."""
        room = dst.num_free_blocks - dst.queued_blocks - self.rules.headroom_blocks
        best = None
        for c in candidates:
            if c.request_id in exclude or c.remaining_tokens < self.rules.min_remaining_tokens:
                continue
            if c.num_blocks <= room and (best is None or c.num_blocks <= best.num_blocks):
                best = c
        return best
