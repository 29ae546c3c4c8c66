"""Triton paged attention against the pure-PyTorch reference (needs CUDA; or, for debugging on
a CPU, Triton's interpreter: ``TRITON_INTERPRET=1 pytest tests/test_triton_attention.py``, fp32).

Every case draws fresh random inputs, uses a strided per-layer view of a block-major cache,
shuffled (non-contiguous) block ids, GQA, context lengths that are not multiples of the block
size, and poisons the output first so an unwritten element shows as NaN. The reference runs in
float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET),
    reason="needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative, ||out - ref|| / ||ref||


def _cache(num_blocks, block_size, kv_heads, head_dim, dtype, layers=3, layer=1):
    """Per-layer K/V views [blocks, block_size, kv_heads, head_dim] of a block-major storage."""
    storage = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim, device=DEVICE).to(dtype)
    return storage[:, layer, 0], storage[:, layer, 1]


def _tables(context_lens, block_size, num_blocks, gen):
    """Disjoint, shuffled block ids for each sequence."""
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for ctx in context_lens:
        n = -(-ctx // block_size)
        tables.append(ids[:n])
        ids = ids[n:]
    return tables


def _metas(query_lens, context_lens, tables, block_size, query_tile, num_splits):
    from kunserve.runtime.attention import AttentionMetadata
    from kunserve.runtime.gpu_inputs import prefill_tiles
    from kunserve.runtime.triton_attention import TritonAttentionMetadata

    reference = AttentionMetadata.build(query_lens, context_lens, tables, block_size, torch.device(DEVICE))
    width = max(map(len, tables))
    padded = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = torch.tensor(t)
    qstart = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    as_dev = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int32), device=DEVICE)  # noqa: E731
    slots = reference.slot_blocks * block_size + reference.slot_offsets
    decode = all(q == 1 for q in query_lens)
    tile_seq, tile_first = (None, None) if decode else map(as_dev, prefill_tiles(qstart, query_tile))
    fast = TritonAttentionMetadata(
        slots=slots.to(torch.int32), block_tables=padded.to(DEVICE), context_lens=as_dev(context_lens),
        block_size=block_size, query_start=None if decode else as_dev(qstart), tile_seq=tile_seq,
        tile_first=tile_first, query_tile=query_tile, num_splits=num_splits)
    return reference, fast


def _compare(query_lens, context_lens, heads, kv_heads, head_dim, block_size, dtype, window=None,
             num_splits=1, seed=0):
    from kunserve.runtime import attention, triton_attention

    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 7
    k_cache, v_cache = _cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = _tables(context_lens, block_size, num_blocks, gen)
    q = torch.randn(sum(query_lens), heads, head_dim, device=DEVICE).to(dtype)
    query_tile = triton_attention.query_tile_for(heads, kv_heads)
    reference, fast = _metas(query_lens, context_lens, tables, block_size, query_tile, num_splits)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_attention(q, k_cache, v_cache, fast, scale, window, out=out)
    expected = attention.paged_attention(q.double(), k_cache.double(), v_cache.double(), reference, scale, window)
    assert not out.isnan().any(), "some output elements were never written"
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < TOLERANCE[dtype], err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 32), (6, 2, 128)])
def test_decode_matches_reference(dtype, num_splits, heads, kv_heads, head_dim):
    context_lens = [1, 5, 16, 17, 64, 100, 333]
    _compare([1] * len(context_lens), context_lens, heads, kv_heads, head_dim, 16, dtype,
             num_splits=num_splits, seed=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 32), (6, 2, 128)])
def test_prefill_with_prefix_matches_reference(dtype, block_size, heads, kv_heads, head_dim):
    # (prefix, chunk): whole prompts, chunks after a cached prefix, and decode rows (mixed step)
    seqs = [(0, 7), (5, 16), (33, 1), (100, 37), (0, 70), (17, 1)]
    _compare([q for _, q in seqs], [p + q for p, q in seqs], heads, kv_heads, head_dim, block_size,
             dtype, seed=block_size)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_sliding_window_matches_reference(kind):
    seqs = [(0, 1), (40, 1), (99, 1)] if kind == "decode" else [(0, 30), (40, 9), (99, 1)]
    _compare([q for _, q in seqs], [p + q for p, q in seqs], 8, 2, 64, 16, torch.float32, window=24,
             num_splits=2 if kind == "decode" else 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_fills_slots_and_skips_padding(dtype):
    from kunserve.runtime import triton_attention

    k_cache, v_cache = _cache(12, 16, 2, 64, dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, 40, -1, 191, 17], dtype=torch.int32, device=DEVICE)
    k = torch.randn(5, 2, 64, device=DEVICE).to(dtype)
    v = torch.randn(5, 2, 64, device=DEVICE).to(dtype)
    meta = triton_attention.TritonAttentionMetadata(
        slots=slots, block_tables=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
        context_lens=torch.ones(1, dtype=torch.int32, device=DEVICE), block_size=16)
    triton_attention.write_kv(k_cache, v_cache, k, v, meta)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            before_k[slot // 16, slot % 16], before_v[slot // 16, slot % 16] = k[row], v[row]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
