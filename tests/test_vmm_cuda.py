"""The unified-virtual-memory semantics of test_vmm.py, re-run on the CUDA backend.

Every test of test_vmm.py not named `test_host_*` is collected here again with the `backend`
fixture below (CUDA, 2 MiB granularity); the tests after it are CUDA-only.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA backend tests need a GPU (torch.cuda.is_available() is False)",
                allow_module_level=True)
pytest.importorskip("cuda.bindings.driver",
                    reason="CUDA backend needs `pip install cuda-bindings`")

try:  # pytest imports test files as `test_vmm` (rootdir-less tests/) or `tests.test_vmm`
    import test_vmm as _semantics
except ImportError:
    from tests import test_vmm as _semantics

from kunserve.runtime.vmm import CudaBackend, UnifiedMemory, UnifiedMemoryConfig, VMMError

globals().update({name: getattr(_semantics, name) for name in dir(_semantics)
                  if name.startswith("test_") and not name.startswith("test_host_")})


@pytest.fixture
def backend():
    return CudaBackend()


def test_cuda_granularity_and_views_are_on_device(backend):
    assert backend.granularity % (2 << 20) == 0
    mem = _semantics.make_mem(backend)
    kv = mem.kv_view(torch.float32, _semantics.BLOCK_SHAPE)
    assert kv.device == backend.device
    kv.fill_(1.0)
    torch.cuda.synchronize()
    assert float(kv.sum()) == kv.numel()
    del kv
    mem.close()


def test_cuda_driver_error_names_the_curesult(backend):
    g = backend.granularity
    too_big = (2 * backend.total_bytes // g) * g  # more physical memory than the device has
    with pytest.raises(VMMError, match=r"cuMemCreate\(.*\) failed with CUDA_ERROR_") as info:
        backend.create_chunk(too_big)
    assert info.value.code == "CUDA_ERROR_OUT_OF_MEMORY"


def test_cuda_reserving_more_than_the_device_has(backend):
    with pytest.raises(ValueError, match="more than the device has"):
        UnifiedMemory(backend, UnifiedMemoryConfig(
            kv_block_bytes=_semantics.BLOCK_BYTES, initial_kv_bytes=0,
            max_kv_bytes=(backend.total_bytes // backend.granularity + 1) * backend.granularity))
