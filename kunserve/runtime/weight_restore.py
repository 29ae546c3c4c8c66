"""Coordinated restore, first phase: a group's dropped weights come back while it keeps serving.

When rank 0 decides to restore a group it sends a ``SplitOrder`` in two phases. ``pull``
(``begin_pull``): every member lists the units it dropped in an order the KV tail can give them
back one at a time (``UnifiedMemory.restore_order``) and the size its KV pool will have once all
are back; the leader turns that into a ``RestoreSchedule`` (round ``k``: each member restores its
``k``-th unit, pulled from the member executing it) and caps admission at the smallest final
pool. Then, like the KV exchange, each member runs one round after its part of every pipeline
step (activations first): it vacates the KV tail blocks over the unit's chunk (moving their
data lower, no request is lost: the cap keeps every member's use below its final pool), maps the
chunk back as weight memory and receives the unit's tensors straight into it from the peer,
which sends from its live parameters. ``split`` then only moves KV (``regroup.split_group``).
"""

from __future__ import annotations

import logging

import attrs
import torch
import torch.distributed as dist

from kunserve.runtime.placement import weight_unit
from kunserve.runtime.transport import recv_object, send_object

log = logging.getLogger(__name__)

Unit = int | str


@attrs.frozen
class UnitPull:
    unit: Unit
    dst: int  # restores the unit
    src: int  # executes it now and sends its tensors


@attrs.frozen
class RestoreSchedule:
    rounds: tuple[tuple[UnitPull, ...], ...]  # each member appears at most once as dst per round
    final_pool: int  # KV blocks every member has once all its weights are back: the admission cap

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)


def holder_of(unit: Unit, ranks: tuple[int, ...], slices: tuple[tuple[int, int], ...]) -> int:
    """The member executing ``unit`` in the group (the embedding on stage 0, the head last)."""
    if unit == "embed":
        return ranks[0]
    if unit == "head":
        return ranks[-1]
    return next(r for r, (a, b) in zip(ranks, slices) if a <= unit < b)


def begin_pull(engine, ranks: tuple[int, ...], slices, rank: int, group) -> "WeightRestore":
    """Every member of the group, in the same cluster step: agree on the schedule."""
    unified = engine.memory.unified
    pending = unified.restore_order(unified.dropped)
    cuts = unified.blocks_to_vacate(pending)
    final = cuts[0] if cuts else engine.block_manager.num_blocks
    leader = ranks[0]
    if rank != leader:
        send_object((pending, final), leader, group)
        schedule = recv_object(leader, group)
    else:
        states = {leader: (pending, final)} | {peer: recv_object(peer, group) for peer in ranks[1:]}
        depth = max(len(p) for p, _ in states.values())
        rounds = tuple(tuple(UnitPull(p[k], m, holder_of(p[k], ranks, slices))
                             for m, (p, _) in sorted(states.items()) if k < len(p)) for k in range(depth))
        schedule = RestoreSchedule(rounds, min(f for _, f in states.values()))
        for peer in ranks[1:]:
            send_object(schedule, peer, group)
    return WeightRestore(rank, schedule, engine, leader=rank == leader)


def _unit_parameters(engine) -> dict[Unit, list[tuple[str, torch.Size]]]:
    """Name and shape of every parameter of the whole model, by unit, in a fixed order (both
    ends of a transfer list a unit's tensors alike)."""
    from kunserve.models import build_model

    with torch.device("meta"):
        full = build_model(engine.model_config)
    by_unit: dict[Unit, list[tuple[str, torch.Size]]] = {}
    for name, param in sorted(full.named_parameters()):
        by_unit.setdefault(weight_unit(name), []).append((name, param.shape))
    return by_unit


class WeightRestore:
    """One member's part of the pull. Invariant: ``received`` holds, by parameter name, the
    tensors of every unit restored so far, placed in their own weight memory."""

    def __init__(self, rank: int, schedule: RestoreSchedule, engine, leader: bool):
        self.rank, self.schedule, self.engine, self.leader = rank, schedule, engine, leader
        self.round = 0
        self.received: dict[str, torch.Tensor] = {}
        self.bytes_sent = 0  # since the owner last took it
        self._total_sent = 0
        self._params = _unit_parameters(engine)
        if leader:
            self._cap_admission()

    @property
    def done(self) -> bool:
        return self.round >= self.schedule.num_rounds

    def take_bytes_sent(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent

    def run_round(self) -> None:
        pulls = self.schedule.rounds[self.round]
        ops = []
        for pull in pulls:  # receives first: the chunk must be weight memory before data lands
            if pull.dst == self.rank:
                ops += [dist.P2POp(dist.irecv, t, pull.src) for t in self._restore(pull.unit)]
        live = dict(self.engine.model.named_parameters())
        for pull in pulls:
            if pull.src == self.rank:
                for name, _shape in self._params[pull.unit]:
                    tensor = live[name].detach().contiguous()
                    ops.append(dist.P2POp(dist.isend, tensor, pull.dst))
                    self.bytes_sent += tensor.numel() * tensor.element_size()  # (tensor kept alive by ops)
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        self.round += 1
        self._total_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        if self.leader:
            self._cap_admission()
        if self.done:
            log.info("rank %d pulled its dropped weights back in %d rounds while serving (%d bytes sent, "
                     "KV pool %d blocks)", self.rank, self.round, self._total_sent, self.engine.block_manager.num_blocks)

    def _restore(self, unit: Unit) -> list[torch.Tensor]:
        """Vacate the KV blocks over ``unit``'s chunk and map it back; its (empty) tensors."""
        memory, dtype = self.engine.memory, self.engine.dtype
        tensors = []

        def place(allocate) -> None:
            for name, shape in self._params[unit]:
                self.received[name] = allocate(name, shape, dtype)
                tensors.append(self.received[name])

        memory.restore_units([unit], _no_preemption, place)
        return tensors

    def _cap_admission(self) -> None:
        """The leader admits only what every member can keep once all weights are back."""
        bm = self.engine.block_manager
        bm.reserved = max(0, bm.num_blocks - self.schedule.final_pool)


def _no_preemption() -> bool:
    raise RuntimeError("a member's KV use exceeds its pool after the restore; the leader's admission "
                       "cap should have prevented this")
