"""CUDA backend of the unified virtual memory: the driver's VMM calls via `cuda.bindings`.

`cuda.bindings.driver` (pip package `cuda-bindings`) is imported only when a `CudaBackend` is
constructed, so CPU-only installs never need it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from kunserve.runtime.vmm_host import (
    Backend, HostBackend, PhysicalChunk, VirtualRange, VMMError)

logger = logging.getLogger(__name__)

__all__ = ["CudaBackend", "make_backend"]


def _load_driver() -> Any:
    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError as exc:
        raise ImportError(
            "CudaBackend needs NVIDIA's CUDA driver bindings: `pip install cuda-bindings` "
            "(matching your CUDA major version)") from exc


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"CudaBackend needs a cuda device, got {dev}")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


class _CudaBytes:
    """Exports `nbytes` device bytes at `ptr` through `__cuda_array_interface__` (v3).

    torch.as_tensor keeps this object alive through the tensor's storage, and it references
    the VirtualRange (`owner`), so the range cannot be freed under a view.
    """

    __slots__ = ("ptr", "nbytes", "owner", "__weakref__")

    def __init__(self, ptr: int, nbytes: int, owner: VirtualRange) -> None:
        self.ptr, self.nbytes, self.owner = ptr, nbytes, owner

    @property
    def __cuda_array_interface__(self) -> dict:
        # uint8 bytes; callers reinterpret with Tensor.view(dtype) (the interface has no bf16).
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 3}


class CudaBackend(Backend):
    """CUDA VMM: cuMemCreate chunks (pinned, on `device`), cuMemAddressReserve ranges.

    Invariant: every driver call's CUresult is checked (a failure raises VMMError with the
    CUresult name and the call); chunks are mapped whole (cuMemMap's offset into a physical
    allocation must be 0), and access is granted read/write to `device` for each mapped run.
    """

    def __init__(self, device: torch.device | str | int | None = None,
                 granularity: int | None = None) -> None:
        self._cu = _load_driver()
        if not torch.cuda.is_available():
            raise RuntimeError("CudaBackend needs a CUDA device (torch.cuda.is_available() is "
                               "False)")
        # Make torch create (and make current) its primary context; the driver calls use it.
        torch.cuda.init()
        self.device = _resolve_device(device)
        torch.cuda.set_device(self.device)
        torch.empty(1, device=self.device)
        self._prop = self._allocation_prop()
        minimum = self._call("cuMemGetAllocationGranularity", self._prop,
                             self._cu.CUmemAllocationGranularity_flags
                             .CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        granularity = minimum if granularity is None else granularity
        if granularity <= 0 or granularity % minimum:
            raise ValueError(f"granularity={granularity} must be a positive multiple of the "
                             f"device's minimum granularity {minimum}")
        self.granularity = granularity
        self.total_bytes = torch.cuda.get_device_properties(self.device).total_memory
        self._access = self._access_desc()
        self._run_unmap_works: bool | None = None  # None: not tried yet

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self._cu, name)(*args)
        err = result[0]
        if err != self._cu.CUresult.CUDA_SUCCESS:
            code = getattr(err, "name", str(err))
            shown = ", ".join(hex(a) if isinstance(a, int) else type(a).__name__ for a in args)
            raise VMMError(f"{name}({shown})", code)
        return result[1] if len(result) == 2 else None

    def _location(self, loc: Any) -> None:
        loc.type = self._cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        loc.id = self.device.index

    def _allocation_prop(self) -> Any:
        prop = self._cu.CUmemAllocationProp()
        prop.type = self._cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._location(prop.location)
        return prop

    def _access_desc(self) -> Any:
        desc = self._cu.CUmemAccessDesc()
        self._location(desc.location)
        desc.flags = self._cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        return desc

    def synchronize(self) -> None:
        # cuMemUnmap does not wait for kernels still reading the range.
        torch.cuda.synchronize(self.device)

    def _reserve(self, nbytes: int) -> int:
        return int(self._call("cuMemAddressReserve", nbytes, self.granularity, 0, 0))

    def _free_range(self, base: int, nbytes: int, mapped: dict) -> None:
        self.synchronize()
        for offset, chunk in sorted(mapped.items()):
            self._unmap_one(base + offset, chunk.nbytes)
        mapped.clear()
        self._call("cuMemAddressFree", base, nbytes)

    def _create(self, nbytes: int) -> Any:
        return self._call("cuMemCreate", nbytes, self._prop, 0)

    def _release(self, handle: Any, nbytes: int) -> None:
        self._call("cuMemRelease", handle)

    def _map_one(self, addr: int, chunk: PhysicalChunk) -> None:
        self._call("cuMemMap", addr, chunk.nbytes, 0, chunk.handle, 0)

    def _set_access(self, addr: int, nbytes: int) -> None:
        # One call for a whole run of chunks: the remap cost is per call, not per byte.
        self._call("cuMemSetAccess", addr, nbytes, [self._access], 1)

    def _unmap_one(self, addr: int, nbytes: int) -> None:
        self._call("cuMemUnmap", addr, nbytes)

    def _unmap_run(self, addr: int, nbytes: int, pieces: list[tuple[int, int]]) -> None:
        # The unmap cost is per call: one cuMemUnmap over a run of adjacent mappings, where the
        # driver accepts it (learned on first use), else one call per chunk.
        if len(pieces) > 1 and self._run_unmap_works is not False:
            try:
                self._unmap_one(addr, nbytes)
                self._run_unmap_works = True
                return
            except VMMError as e:
                if self._run_unmap_works:
                    raise
                self._run_unmap_works = False
                logger.info("cuMemUnmap over a run of chunks refused (%s); unmapping per chunk", e.code)
        super()._unmap_run(addr, nbytes, pieces)

    def _view(self, addr: int, nbytes: int, owner: VirtualRange) -> tuple[torch.Tensor, Any]:
        exporter = _CudaBytes(addr, nbytes, owner)
        return torch.as_tensor(exporter, device=self.device), exporter  # [nbytes] uint8


def make_backend(device: torch.device | str, **kwargs) -> Backend:
    """HostBackend for a cpu device, CudaBackend for a cuda one."""
    device = torch.device(device)
    if device.type == "cpu":
        return HostBackend(**kwargs)
    if device.type == "cuda":
        return CudaBackend(device, **kwargs)
    raise ValueError(f"no unified-memory backend for device type {device.type!r}")
