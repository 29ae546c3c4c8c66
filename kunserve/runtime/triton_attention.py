"""Triton paged attention over the block-major KV cache: the CUDA path.

The kernels read each sequence's block table directly, so no K/V is gathered into padded
tensors. Per-layer caches are strided views ``[num_blocks, block_size, kv_heads, head_dim]`` of
the block-major storage; every kernel takes their strides and needs only ``head_dim`` to be
contiguous. Grouped-query attention is packed: one program serves all query heads of one KV
head, so every K/V row is read once per program. Scores and sums are fp32 (exp2 domain);
probabilities are cast to the cache dtype for the second matrix product, as flash attention does.

* decode (every sequence has one query): grid ``(sequences, kv_heads, splits)``; with several
  splits each program covers a slice of the context and a small kernel merges the slices
  (split-K / flash-decoding), which keeps the GPU busy at small batch.
* prefill with prefix (chunked prefill, mixed steps): grid ``(query tiles, kv_heads)``; a tile
  holds ``query_tile`` consecutive queries of one sequence, which attend to the cached prefix
  and causally within the chunk.

A non-zero ``window`` restricts keys to the last ``window`` positions (sliding window).
"""

from __future__ import annotations

import attrs
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
ROWS_PER_TILE = 64  # query rows (tokens x padded group) of one prefill program
# Launch parameters (measured on the H100; see docs/gpu-notes.md)
DECODE_TILE = 64  # keys per decode iteration
DECODE_WARPS = 4
PREFILL_KEY_TILE = 32
PREFILL_WARPS = 4
PREFILL_STAGES = 3


@attrs.frozen
class TritonAttentionMetadata:
    """Per-step paging metadata on the device, built once per step and shared by all layers.

    Invariants: every block-table entry a kernel reads (``< cdiv(context_len, block_size)``) is
    a valid block id; decode steps have ``tile_seq is None`` and one query row per sequence.
    """

    slots: torch.Tensor  # [T] int32: block * block_size + offset of each new K/V row; < 0: skip
    block_tables: torch.Tensor  # [B, W] int32, rows padded with valid ids
    context_lens: torch.Tensor  # [B] int32: context length including this step's queries
    block_size: int
    query_start: torch.Tensor | None = None  # [B + 1] int32: first row of each sequence in T
    tile_seq: torch.Tensor | None = None  # [tiles] int32: sequence of each prefill query tile
    tile_first: torch.Tensor | None = None  # [tiles] int32: first query index of the tile
    query_tile: int = 1
    num_splits: int = 1

    @property
    def is_decode(self) -> bool:
        return self.tile_seq is None


def padded_group(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head, rounded up to a power of two (rows of a packed tile)."""
    return triton.next_power_of_2(num_heads // num_kv_heads)


def query_tile_for(num_heads: int, num_kv_heads: int) -> int:
    """Queries per prefill tile so that a tile has ``ROWS_PER_TILE`` packed rows."""
    return max(1, ROWS_PER_TILE // padded_group(num_heads, num_kv_heads))


def decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split-K factor (power of two): programs for one wave, each split >= 64 keys (measured:
    at batch 32 x 8 KV heads one split beats two)."""
    splits = 1
    while (splits < MAX_SPLITS and batch * num_kv_heads * splits < num_sms
           and max_context >= 64 * splits * 2):
        splits *= 2
    return splits


# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     s_kt, s_kh, s_vt, s_vh, s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    block = tl.maximum(slot, 0).to(tl.int64) // BLOCK_SIZE  # int64: the cache can exceed 2^31 elements
    row = tl.maximum(slot, 0) % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM) & (slot >= 0)  # padding rows (slot < 0) write nothing
    k = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=mask)
    v = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=mask)
    tl.store(kc_ptr + block * s_kcb + row * s_kcs + h * s_kch + d, k, mask=mask)
    tl.store(vc_ptr + block * s_vcb + row * s_vcs + h * s_vch + d, v, mask=mask)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_base, v_base, table, tok, tok_ok, allowed,
                 s_kb, s_ks, s_vb, s_vs, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One online-softmax step over keys ``tok`` [N]; q [R, D], acc [R, D], m_i/l_i [R]."""
    blocks = tl.load(table + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
    rows = tok % BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    kv_mask = tok_ok[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(k_base + blocks[:, None] * s_kb + rows[:, None] * s_ks + d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [R, N], log2 domain
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + blocks[:, None] * s_vb + rows[:, None] * s_vs + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, part_ptr, ml_ptr, table_ptr, ctx_ptr,
                   qk_scale, window, s_qt, s_qh, s_ot, s_oh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_tb,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   TILE: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    lo_tile = (lo // TILE) * TILE
    per_split = tl.cdiv(tl.cdiv(ctx - lo_tile, TILE), NUM_SPLITS) * TILE
    start = lo_tile + split * per_split
    end = tl.minimum(ctx, start + per_split)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * s_qt + heads[:, None] * s_qh + d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = table_ptr + seq.to(tl.int64) * s_tb
    for t0 in range(start, end, TILE):
        tok = t0 + tl.arange(0, TILE)
        tok_ok = (tok < end) & (tok >= lo)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, kc_ptr + kvh * s_kh, vc_ptr + kvh * s_vh, table,
                                     tok, tok_ok, tok_ok[None, :], s_kb, s_ks, s_vb, s_vs, qk_scale,
                                     HEAD_DIM, BLOCK_D, BLOCK_SIZE, PRECISION)
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * s_ot + heads[:, None] * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=q_mask)
    else:
        part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_G] row of [B, H, S]
        tl.store(part_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        tl.store(ml_ptr + part * 2, m_i, mask=g < GROUP)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(part_ptr, ml_ptr, out_ptr, s_ot, s_oh, NUM_HEADS: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + s  # [S]
    m = tl.load(ml_ptr + part * 2)
    l = tl.load(ml_ptr + part * 2 + 1)
    weight = tl.where(l > 0, tl.exp2(m - tl.max(m, 0)), 0.0)  # empty splits have l == 0, m == -inf
    acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM, other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(out_ptr + seq * s_ot + head * s_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, table_ptr, ctx_ptr, qstart_ptr, tile_seq_ptr,
                    tile_first_ptr, qk_scale, window, s_qt, s_qh, s_ot, s_oh,
                    s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_tb,
                    GROUP: tl.constexpr, GROUP_P: tl.constexpr, QUERY_TILE: tl.constexpr,
                    KEY_TILE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    tile, kvh = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_first_ptr + tile)
    q0 = tl.load(qstart_ptr + seq)
    qlen = tl.load(qstart_ptr + seq + 1) - q0
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - qlen
    r = tl.arange(0, QUERY_TILE * GROUP_P)  # packed rows: query r // GROUP_P, head r % GROUP_P
    qi = first + r // GROUP_P
    g = r % GROUP_P
    d = tl.arange(0, BLOCK_D)
    row_ok = (qi < qlen) & (g < GROUP)
    q_pos = prefix + qi
    heads = kvh * GROUP + g
    rows = (q0 + qi).to(tl.int64)
    q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * s_qt + heads[:, None] * s_qh + d[None, :], mask=q_mask, other=0.0)
    hi = prefix + tl.minimum(first + QUERY_TILE, qlen)  # one past the tile's last query position
    lo = tl.where(window > 0, tl.maximum(prefix + first - window + 1, 0), 0)
    m_i = tl.full([QUERY_TILE * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([QUERY_TILE * GROUP_P], tl.float32)
    acc = tl.zeros([QUERY_TILE * GROUP_P, BLOCK_D], tl.float32)
    table = table_ptr + seq.to(tl.int64) * s_tb
    for t0 in range((lo // KEY_TILE) * KEY_TILE, hi, KEY_TILE):
        tok = t0 + tl.arange(0, KEY_TILE)
        tok_ok = (tok < hi) & (tok >= lo)
        allowed = (tok[None, :] <= q_pos[:, None]) & tok_ok[None, :]
        allowed &= (window <= 0) | (tok[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, kc_ptr + kvh * s_kh, vc_ptr + kvh * s_vh, table,
                                     tok, tok_ok, allowed, s_kb, s_ks, s_vb, s_vs, qk_scale,
                                     HEAD_DIM, BLOCK_D, BLOCK_SIZE, PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * s_ot + heads[:, None] * s_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


# -- launchers ---------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; bf16 ignores it


def write_kv(k_cache, v_cache, k, v, meta: TritonAttentionMetadata) -> None:
    """Store this step's K/V rows [T, kv_heads, head_dim] at ``meta.slots`` (skipping < 0)."""
    t, kv_heads, head_dim = k.shape
    assert k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, meta.slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=meta.block_size,
    )


def paged_attention(q, k_cache, v_cache, meta: TritonAttentionMetadata, scale: float,
                    window: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim] (strided)."""
    out = torch.empty_like(q) if out is None else out  # [T, heads, head_dim]
    if q.shape[0] == 0:
        return out
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    args = dict(qk_scale=scale * LOG2E, window=window or 0)
    if meta.is_decode:
        _decode(q, k_cache, v_cache, out, meta, args)
    else:
        _prefill(q, k_cache, v_cache, out, meta, args)
    return out


def _cache_strides(k_cache, v_cache) -> tuple[int, ...]:
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def _decode(q, k_cache, v_cache, out, meta: TritonAttentionMetadata, args: dict) -> None:
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group, splits = num_heads // kv_heads, meta.num_splits
    part = ml = out  # unused when there is one split
    if splits > 1:
        part = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(batch, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    tile = DECODE_TILE if q.dtype != torch.float32 or head_dim <= 64 else 32
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, out, part, ml, meta.block_tables, meta.context_lens, args["qk_scale"],
        args["window"], q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), meta.block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=meta.block_size, TILE=tile,
        NUM_SPLITS=splits, PRECISION=_precision(q.dtype), num_warps=DECODE_WARPS,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part, ml, out, out.stride(0), out.stride(1), NUM_HEADS=num_heads, NUM_SPLITS=splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
        )


def _prefill(q, k_cache, v_cache, out, meta: TritonAttentionMetadata, args: dict) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    group_p = triton.next_power_of_2(group)
    assert meta.query_tile * group_p >= 16, "a prefill tile needs at least 16 packed rows"
    big = q.dtype == torch.float32 or head_dim > 128
    _prefill_kernel[(meta.tile_seq.shape[0], kv_heads)](
        q, k_cache, v_cache, out, meta.block_tables, meta.context_lens, meta.query_start,
        meta.tile_seq, meta.tile_first, args["qk_scale"], args["window"],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), meta.block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, QUERY_TILE=meta.query_tile, KEY_TILE=32 if big else PREFILL_KEY_TILE,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=meta.block_size,
        PRECISION=_precision(q.dtype), num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES,
    )
