"""One instance's memory: weight placement, KV cache tensors and block bookkeeping together.

With the unified (VMM) allocator, weights and KV share physical chunks: ``drop_units`` moves
weight units the instance no longer executes into the KV cache (more blocks at once, no copy);
``restore_units`` first vacates the tail blocks those chunks carry (moving their data to free
blocks lower down, preempting the newest requests only if there is no room), then takes the
chunks back for the weights. With ``memory="torch"`` plain tensors are used and nothing can be
dropped.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from kunserve.models.loader import Allocator
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.kv_cache import PagedKVCache, kv_block_bytes
from kunserve.runtime.placement import WeightPlacement, weight_unit

log = logging.getLogger(__name__)


def vmm_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False
    return True


class InstanceMemory:
    """Invariants: ``block_manager.num_blocks == kv_cache.num_blocks``; every KV tensor view is
    owned by ``kv_cache`` (rebuilt after each drop/restore), so nothing else can hold a view
    over memory the allocator takes back."""

    def __init__(
        self, model: nn.Module, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
        device: torch.device, block_size: int, num_blocks: int, use_vmm: bool,
    ):
        layer_ids = model.layer_ids
        self.block_shape = (len(layer_ids), 2, block_size, num_kv_heads, head_dim)
        self.block_bytes = kv_block_bytes(len(layer_ids), block_size, num_kv_heads, head_dim, dtype)
        self.dtype, self.device = dtype, device
        self.unified = self.placement = None
        if use_vmm:
            storage = self._make_unified(model, num_blocks)
        else:
            storage = torch.zeros((num_blocks, *self.block_shape), dtype=dtype, device=device)
        self.kv_cache = PagedKVCache(storage, layer_ids, block_size)
        self.block_manager = BlockManager(num_blocks, block_size)
        # The first mapping is rounded up to the allocator granularity; that slack joins the pool
        # at the first drop and leaves it when every weight unit is back.
        self.base_blocks = num_blocks
        self.executed_units = {weight_unit(name) for name, _ in model.named_parameters()}

    def _make_unified(self, model: nn.Module, num_blocks: int) -> torch.Tensor:
        from kunserve.runtime.vmm import UnifiedMemory, UnifiedMemoryConfig, align_up, make_backend

        backend = make_backend(self.device)
        initial = align_up(num_blocks * self.block_bytes, backend.granularity)
        self.unified = UnifiedMemory(backend, UnifiedMemoryConfig(kv_block_bytes=self.block_bytes,
                                                                   initial_kv_bytes=initial))
        self.placement = WeightPlacement(self.unified, model, self.dtype)
        return self.unified.kv_view(self.dtype, self.block_shape, num_blocks)

    @property
    def allocator(self) -> Allocator | None:
        return None if self.placement is None else self.placement.allocate

    def placement_units(self) -> set:
        """Weight units still in weight memory (placed and not dropped)."""
        return set(self.placement.unit_bytes) - set(self.unified.dropped)

    def relayout(self, layer_ids: range) -> None:
        """View the KV range with blocks of ``layer_ids`` only (after the model was re-sliced).
        Bytes are not moved: an old block of L layers becomes L / len(layer_ids) new blocks."""
        self._require_unified()
        num_kv_heads, head_dim = self.block_shape[3], self.block_shape[4]
        self.block_shape = (len(layer_ids), *self.block_shape[1:])
        self.block_bytes = kv_block_bytes(len(layer_ids), self.block_shape[2], num_kv_heads, head_dim, self.dtype)
        self.unified.set_kv_block_bytes(self.block_bytes)
        self.kv_cache.storage = None
        self.kv_cache.layer_ids = layer_ids
        self._remap(self.unified.num_kv_blocks)
        self.base_blocks = self.kv_cache.num_blocks

    def limit_blocks(self, num_blocks: int) -> None:
        """Shrink an unused pool to ``num_blocks`` (pipeline members size their pools alike)."""
        assert self.block_manager.num_free_blocks == self.block_manager.num_blocks, "pool in use"
        num_blocks = min(num_blocks, self.block_manager.num_blocks)
        self.block_manager.truncate(num_blocks)
        self.kv_cache.storage = self.kv_cache.storage[:num_blocks]
        self.base_blocks = num_blocks

    # -- drop / restore -----------------------------------------------------------------------
    def drop_units(self, units: Iterable[int | str]) -> int:
        """Give weight units this instance does not execute to the KV cache; new block count."""
        units = list(units)
        self._require_unified()
        executed = [u for u in units if u in self.executed_units]
        if executed:
            raise ValueError(f"weight units {executed} are still executed by this instance; "
                             f"re-slice the model before dropping them")
        self.unified.drop(units)
        added = self.unified.num_kv_blocks - self.block_manager.num_blocks
        self._remap(self.unified.num_kv_blocks)
        self.block_manager.add_blocks(added)
        log.info("dropped weight units %s: +%d KV blocks (%d total)", units, added,
                 self.block_manager.num_blocks)
        return self.block_manager.num_blocks

    def restore_units(
        self, units: Iterable[int | str], preempt_newest: Callable[[], bool],
        reload: Callable[[Callable], None],
    ) -> int:
        """Take weight units back from the KV tail; ``reload(allocate)`` refills them.

        Requests on the tail blocks are moved to free blocks below the cut; while there are
        too few, ``preempt_newest()`` frees some (it returns False when nothing is left).
        """
        units = list(units)
        self._require_unified()
        vacate = self.unified.blocks_to_vacate(units)
        cut = min(vacate[0], self.block_manager.num_blocks) if vacate else self.block_manager.num_blocks
        if not set(self.unified.dropped) - set(units):
            cut = min(cut, self.base_blocks)  # all weights back: the pool is as first configured
        while not self.block_manager.can_vacate_from(cut):
            if not preempt_newest():
                raise RuntimeError(f"cannot vacate KV blocks >= {cut} for restoring {units}")
        moves = self.block_manager.vacate_from(cut)  # [(old block, new block)]
        if moves:
            old, new = (torch.tensor(ids, device=self.device) for ids in zip(*moves))
            self.kv_cache.storage[new] = self.kv_cache.storage[old]
        self.block_manager.truncate(cut)
        self.kv_cache.storage = None  # release the only view over the tail before unmapping
        self.unified.restore(units)
        reload(self.placement.allocate)
        self._remap(cut)
        log.info("restored weight units %s: moved %d KV blocks, %d blocks left", units, len(moves), cut)
        return cut

    def _remap(self, num_blocks: int) -> None:
        self.kv_cache.storage = self.unified.kv_view(self.dtype, self.block_shape, num_blocks)

    def _require_unified(self) -> None:
        if self.unified is None:
            raise ValueError("weights can be dropped only with the unified allocator (memory='vmm')")
