"""Fused Triton kernels for the pointwise parts of a Llama-family layer (CUDA only).

In PyTorch an RMSNorm is ~7 kernels, rotary ~5 per tensor and SiLU-and-multiply 2; each is a
full pass over the activations and, in a decode step, a few microseconds of launch latency.
These kernels do each in one pass and round exactly where the PyTorch code does (every
elementwise product is rounded to the model dtype), so they follow the reference to the last
bit except for the order of RMSNorm's sum. Imported lazily: CPU installs need no Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, s_x, s_o, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    normed = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * s_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, s_x, s_d, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * s_d + cols, mask=mask, other=0.0).to(tl.float32)
    total = (x + d).to(dtype)  # the residual stream, rounded as `x + d` in PyTorch
    tl.store(sum_ptr + row * n + cols, total, mask=mask)
    t = total.to(tl.float32)
    inv = tl.rsqrt(tl.sum(t * t, 0) / n + eps)
    normed = (t * inv).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (w * normed).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, s_xt, s_xh, s_ot, s_oh, s_ct,
                   NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    half: tl.constexpr = HEAD_DIM // 2
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + t * s_xt + h * s_xh + d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.where(d < half, d + half, d - half)
    xp = tl.load(x_ptr + t * s_xt + h * s_xh + partner, mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(d < half, -xp, xp)  # rotate_half(x)
    cos = tl.load(cos_ptr + t * s_ct + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * s_ct + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    a = (x * cos).to(dtype).to(tl.float32)
    b = (rotated * sin).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * s_ot + h * s_oh + d, (a + b).to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + offs, (silu * u).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., n] (fp32 statistics, as transformers)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # a view for the contiguous activations we see
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n, eps,
                                       BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(x + delta, rms_norm(x + delta))`` in one pass; x, delta: [T, n] with unit column stride."""
    t, n = x.shape
    assert x.stride(1) == delta.stride(1) == 1 and x.dtype == delta.dtype == weight.dtype
    total = torch.empty((t, n), dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    block = triton.next_power_of_2(n)
    if t:
        _add_rms_norm_kernel[(t,)](x, delta, weight, total, out, x.stride(0), delta.stride(0), n, eps,
                                   BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return total, out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [T, heads, head_dim], cos/sin [T, head_dim]."""
    t, heads, head_dim = x.shape
    assert x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    out = torch.empty((t, heads, head_dim), dtype=x.dtype, device=x.device)
    if t:
        _rotary_kernel[(t,)](x, cos, sin, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                             cos.stride(0), NUM_HEADS=heads, HEAD_DIM=head_dim,
                             BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim),
                             num_warps=4)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for contiguous tensors of one shape."""
    assert gate.is_contiguous() and up.is_contiguous() and gate.shape == up.shape
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 2048
    if n:
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=8)
    return out
