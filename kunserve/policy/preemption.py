"""What happens to a preempted request's KV: recompute it later (vLLM v1) or swap it to host
memory and back (InferCept-style). Plain numbers in, a decision out; the scheduler applies it.

Both policies preempt the same victim, the newest running request (the scheduler's invariant:
``running`` is in admission order, FCFS fairness); they differ in what the victim keeps and in
when a swapped request may come back.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import attrs


class Preempt(enum.Enum):
    RECOMPUTE = "recompute"  # drop the KV; the request is prefilled again when re-admitted
    SWAP = "swap"  # copy the KV to the host swap space; copied back when re-admitted
    FALLBACK = "fallback"  # wanted to swap, the swap space is full: recompute (counted, logged)


@attrs.frozen
class RecomputePreemption:
    """vLLM v1: every victim is recomputed."""

    swaps: ClassVar[bool] = False

    def on_preempt(self, victim_blocks: int, host_free_blocks: int) -> Preempt:
        return Preempt.RECOMPUTE

    def may_swap_in(self, blocks: int, blocks_swapped_in_this_step: int) -> bool:
        return True  # nothing is ever swapped


def _positive(_inst, attr, value):
    if value < 1:
        raise ValueError(f"{attr.name} must be a positive integer, got {value}")


@attrs.frozen
class SwapPreemption:
    """Swap a victim's computed KV blocks out when the host swap space has room for all of them.

    A victim with no computed KV has nothing to save (plain recompute, not a fallback). Swap-ins
    are bounded per step by ``swap_bytes_per_step`` so a burst of returning requests cannot stall
    one step on copies; the first swap-in of a step is always allowed, so a request whose KV is
    larger than the whole budget still comes back (progress). Swap-outs are never deferred: the
    blocks they free are used in the same step (see ``runtime/swap.py``).
    """

    swaps: ClassVar[bool] = True

    block_bytes: int = attrs.field(validator=_positive)
    swap_bytes_per_step: int = attrs.field(validator=_positive)

    def on_preempt(self, victim_blocks: int, host_free_blocks: int) -> Preempt:
        if victim_blocks == 0:
            return Preempt.RECOMPUTE
        return Preempt.SWAP if victim_blocks <= host_free_blocks else Preempt.FALLBACK

    def may_swap_in(self, blocks: int, blocks_swapped_in_this_step: int) -> bool:
        if blocks_swapped_in_this_step == 0:
            return True
        return (blocks_swapped_in_this_step + blocks) * self.block_bytes <= self.swap_bytes_per_step
