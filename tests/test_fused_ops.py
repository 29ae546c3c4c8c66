"""Fused Triton pointwise kernels against the PyTorch ops they replace (needs CUDA; or
``TRITON_INTERPRET=1`` to run them in Triton's interpreter on a CPU, fp32 only)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET),
    reason="needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


def _close(out, ref):
    """fp32: rounding-level; bf16: at most one bf16 ulp apart (the ops round at the same places)."""
    assert not out.isnan().any()
    tol = 1e-6 if out.dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 16), (7, 4096)])
def test_rms_norm(dtype, shape):
    from kunserve.models import fused_ops
    from kunserve.models.llama import RMSNorm

    norm = RMSNorm(shape[-1], 1e-5).to(DEVICE, dtype)
    norm.weight.data.normal_()
    x = torch.randn(shape, device=DEVICE).to(dtype)
    x32 = x.float()
    ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    _close(fused_ops.rms_norm(x, norm.weight, 1e-5), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (6, 128)])
def test_rotary(dtype, heads, head_dim):
    from kunserve.models import fused_ops
    from kunserve.models.rope import apply_rotary

    t = 9
    x = torch.randn(t, heads, head_dim, device=DEVICE).to(dtype)
    angles = torch.rand(t, head_dim, device=DEVICE) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    _close(fused_ops.rotary(x, cos, sin), apply_rotary(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    from kunserve.models import fused_ops

    gate = torch.randn(37, 300, device=DEVICE).to(dtype) * 4
    up = torch.randn(37, 300, device=DEVICE).to(dtype)
    _close(fused_ops.silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    from kunserve.models import fused_ops
    from kunserve.models.llama import RMSNorm

    norm = RMSNorm(256, 1e-6).to(DEVICE, dtype)
    norm.weight.data.normal_()
    x = torch.randn(11, 256, device=DEVICE).to(dtype)
    delta = torch.randn(11, 256, device=DEVICE).to(dtype)
    total, normed = fused_ops.add_rms_norm(x, delta, norm.weight, 1e-6)
    assert torch.equal(total, x + delta)  # the residual stream is bit-identical
    t32 = (x + delta).float()
    _close(normed, norm.weight * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype))
