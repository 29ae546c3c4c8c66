"""Plain snapshots of the cluster that policies read (no tensors, no process groups)."""

from __future__ import annotations

import attrs


@attrs.frozen
class InstanceSnapshot:
    """One instance's memory and queue state, in KV blocks.

    ``memory_demand_blocks`` is Llumnix's measure: KV held by running requests plus what the
    head-of-line queued request needs. ``queued_blocks`` is what every queued request needs to
    start (its uncomputed tokens), the amount a drop must free to admit the whole queue.
    """

    instance_id: int
    block_size: int
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    hol_blocks: int = 0
    queued_blocks: int = 0
    num_preemptions: int = 0  # all preemptions, swapped or recomputed
    # swap preemption (--policy swap); zero under the other policies
    num_swap_preemptions: int = 0
    num_recompute_fallbacks: int = 0  # victims recomputed because the swap space was full
    num_continued_prefill_chunks: int = 0  # prompt chunks that rode in another request set's step
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0
    exchanging: bool = False  # a group still moving KV after a merge or weights before a split: no new order

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def memory_demand_blocks(self) -> int:
        return self.used_blocks + self.hol_blocks

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.num_blocks


@attrs.frozen
class ClusterSnapshot:
    instances: tuple[InstanceSnapshot, ...]

    def by_id(self, instance_id: int) -> InstanceSnapshot:
        return next(i for i in self.instances if i.instance_id == instance_id)
