"""Pure-PyTorch paged attention: the CPU path and the reference for GPU kernels.

A step's tokens are flattened to ``T`` rows (all sequences, one after another). K/V rows are
written into the paged cache by slot (``block_id * block_size + offset``); attention then
gathers each sequence's whole context through its block table and runs standard scaled
dot-product attention with a causal (and optional sliding-window) mask.

Sequences are split into *attention groups* so padding stays cheap: all single-token (decode)
sequences form one group; every multi-token (prefill / chunked prefill) sequence is its own
group. Within a group queries are padded to the longest query and keys to the longest context.
``AttentionMetadata`` is built once per step and shared by every layer.

Dispatch: ``write_kv`` and ``paged_attention`` take either this module's ``AttentionMetadata``
(the reference path, any device) or ``triton_attention.TritonAttentionMetadata`` (the CUDA path,
built by ``model_runner``), and run the matching implementation.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch
import torch.nn.functional as F


@attrs.frozen
class AttentionGroup:
    """Padded gather indices for a set of sequences attended in one SDPA call.

    Invariants: ``key_blocks``/``key_offsets`` index valid cache rows everywhere (padding points
    at block 0, row 0) and every padded query row attends to at least one key, so no row is NaN.
    """

    query_index: torch.Tensor  # [b, max_q] long: row in the flat T tokens (0 for padding)
    query_valid: torch.Tensor  # [b, max_q] bool
    key_blocks: torch.Tensor  # [b, max_ctx] long: cache block of each context position
    key_offsets: torch.Tensor  # [b, max_ctx] long: row inside that block
    query_positions: torch.Tensor  # [b, max_q] long: absolute position of each query
    key_valid: torch.Tensor  # [b, max_ctx] bool: position < context length
    masks: dict = attrs.field(factory=dict)  # window (None = full) -> [b, 1, max_q, max_ctx] bool

    def mask_for(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            self.masks[window] = self._build_mask(window)
        return self.masks[window]

    def _build_mask(self, window: int | None) -> torch.Tensor:
        key_pos = torch.arange(self.key_blocks.shape[1], device=self.key_blocks.device)
        q_pos = self.query_positions[:, :, None]  # [b, max_q, 1]
        allowed = (key_pos[None, None, :] <= q_pos) & self.key_valid[:, None, :]
        if window is not None:
            allowed &= key_pos[None, None, :] > q_pos - window
        # Padded query rows look at key 0 so softmax never sees an all-masked row.
        allowed[:, :, 0] |= ~self.query_valid
        return allowed[:, None]  # [b, 1, max_q, max_ctx]


@attrs.frozen
class AttentionMetadata:
    """Per-step paging metadata shared by all layers of a forward pass."""

    slot_blocks: torch.Tensor  # [T] long: cache block each new token's K/V is written to
    slot_offsets: torch.Tensor  # [T] long: row inside that block
    groups: tuple[AttentionGroup, ...]
    num_tokens: int

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device,
    ) -> "AttentionMetadata":
        """``context_lens[i]`` counts the sequence's tokens including this step's queries."""
        starts, slot_blocks, slot_offsets = [], [], []
        start = 0
        for qlen, ctx, table in zip(query_lens, context_lens, block_tables):
            starts.append(start)
            start += qlen
            for pos in range(ctx - qlen, ctx):
                slot_blocks.append(table[pos // block_size])
                slot_offsets.append(pos % block_size)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        prefill = [[i] for i, q in enumerate(query_lens) if q > 1]
        member_sets = ([decode] if decode else []) + prefill
        groups = tuple(
            _build_group(m, starts, query_lens, context_lens, block_tables, block_size, device)
            for m in member_sets
        )
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(slot_blocks), as_long(slot_offsets), groups, start)


def _build_group(members, starts, query_lens, context_lens, block_tables, block_size, device):
    max_q = max(query_lens[i] for i in members)
    max_ctx = max(context_lens[i] for i in members)
    b = len(members)
    q_index = torch.zeros(b, max_q, dtype=torch.long)
    q_valid = torch.zeros(b, max_q, dtype=torch.bool)
    q_pos = torch.zeros(b, max_q, dtype=torch.long)
    k_blocks = torch.zeros(b, max_ctx, dtype=torch.long)
    k_valid = torch.zeros(b, max_ctx, dtype=torch.bool)
    ctx_positions = torch.arange(max_ctx)
    for row, i in enumerate(members):
        qlen, ctx = query_lens[i], context_lens[i]
        q_index[row, :qlen] = torch.arange(starts[i], starts[i] + qlen)
        q_valid[row, :qlen] = True
        q_pos[row, :qlen] = torch.arange(ctx - qlen, ctx)
        table = torch.tensor(block_tables[i][: (ctx + block_size - 1) // block_size], dtype=torch.long)
        k_blocks[row, :ctx] = table[ctx_positions[:ctx] // block_size]
        k_valid[row, :ctx] = True
    k_offsets = torch.where(k_valid, ctx_positions[None, :] % block_size, 0)
    return AttentionGroup(
        q_index.to(device), q_valid.to(device), k_blocks.to(device), k_offsets.to(device),
        q_pos.to(device), k_valid.to(device),
    )


def _triton_path(meta):
    """The Triton module if ``meta`` is device metadata for it, else None (reference path)."""
    if isinstance(meta, AttentionMetadata):
        return None
    from kunserve.runtime import triton_attention  # imported lazily: CPU installs have no Triton

    return triton_attention


def write_kv(k_cache, v_cache, k, v, meta: AttentionMetadata) -> None:
    """Store this step's K/V rows. caches: [num_blocks, block_size, kv_heads, head_dim];
    k, v: [T, kv_heads, head_dim]. Works on strided (block-major) cache views too."""
    if (triton_path := _triton_path(meta)) is not None:
        return triton_path.write_kv(k_cache, v_cache, k, v, meta)
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [T, heads, head_dim]
    if (triton_path := _triton_path(meta)) is not None:
        return triton_path.paged_attention(q, k_cache, v_cache, meta, scale, window)
    out = torch.empty_like(q)
    for g in meta.groups:
        qg = q[g.query_index].transpose(1, 2)  # [b, heads, max_q, D]
        kg = k_cache[g.key_blocks, g.key_offsets].transpose(1, 2)  # [b, kv_heads, max_ctx, D]
        vg = v_cache[g.key_blocks, g.key_offsets].transpose(1, 2)
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask_for(window), scale=scale,
            enable_gqa=qg.shape[1] != kg.shape[1],
        )  # [b, heads, max_q, D]
        og = og.transpose(1, 2)  # [b, max_q, heads, D]
        out[g.query_index[g.query_valid]] = og[g.query_valid]
    return out
