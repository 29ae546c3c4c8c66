"""Paged KV-cache storage.

Layout is block-major: ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``. One
block holds every local layer's K and V for ``block_size`` tokens, so growing the backing memory
at its tail (the VMM drop) adds whole blocks without moving existing data. Per-layer K and V are
strided views ``[num_blocks, block_size, num_kv_heads, head_dim]`` that attention indexes by
(block, offset).
"""

from __future__ import annotations

import torch


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


class PagedKVCache:
    """K/V tensors for the layers ``layer_ids`` of one stage.

    Invariant: ``storage`` has shape ``[num_blocks, len(layer_ids), 2, block_size, kv_heads,
    head_dim]``; ``layer(l)`` views it without copying.
    """

    def __init__(self, storage: torch.Tensor, layer_ids: range, block_size: int):
        assert storage.dim() == 6 and storage.shape[1] == len(layer_ids) and storage.shape[3] == block_size
        self.storage = storage
        self.layer_ids = layer_ids
        self.block_size = block_size

    @classmethod
    def allocate(cls, num_blocks, layer_ids: range, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_blocks, len(layer_ids), 2, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), layer_ids, block_size)

    @property
    def num_blocks(self) -> int:
        return self.storage.shape[0]

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        local = layer_id - self.layer_ids.start
        kv = self.storage[:, local]  # [num_blocks, 2, block_size, kv_heads, head_dim]
        return kv[:, 0], kv[:, 1]

    def by_layer(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {layer_id: self.layer(layer_id) for layer_id in self.layer_ids}
