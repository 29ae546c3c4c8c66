"""Backend interface of the unified virtual memory, and its host (CPU) backend.

A backend reserves virtual address ranges, creates physical chunks, maps whole chunks into
ranges at granularity-aligned offsets, unmaps them again (the range stays reserved), and makes
zero-copy uint8 tensors over mapped bytes. `UnifiedMemory` (vmm.py) builds on this interface;
`CudaBackend` (vmm_cuda.py) implements it with the CUDA driver's VMM calls, `HostBackend` here
with memfd_create + mmap, so CPU tests exercise the very same remapping logic.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import gc
import logging
import mmap
import os
import sys
import weakref
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Backend", "HostBackend", "PhysicalChunk", "ViewRegistry", "VirtualRange", "VMMError",
    "align_down", "align_up",
]


class VMMError(RuntimeError):
    """A backend call failed: `call` names it, `code` is the error's name (CUresult or errno)."""

    def __init__(self, call: str, code: str, detail: str = "") -> None:
        self.call, self.code = call, code
        super().__init__(f"{call} failed with {code}" + (f": {detail}" if detail else ""))


def align_up(nbytes: int, granularity: int) -> int:
    return -(-nbytes // granularity) * granularity


def align_down(nbytes: int, granularity: int) -> int:
    return nbytes // granularity * granularity


def _no_atexit(fin: weakref.finalize) -> weakref.finalize:
    # At interpreter exit the OS / driver frees everything anyway; unmapping then could pull
    # memory from under tensors that module teardown still references.
    fin.atexit = False
    return fin


class PhysicalChunk:
    """Physical memory of `nbytes` bytes (a multiple of the backend's granularity).

    Invariant: `handle` stays valid until `release()` or until the chunk is garbage-collected;
    while it is mapped, the range that maps it holds a reference, so a mapped chunk is never
    released under a mapping.
    """

    __slots__ = ("nbytes", "handle", "_finalizer", "__weakref__")

    def __init__(self, nbytes: int, handle: Any, release: Callable[[Any, int], None]) -> None:
        self.nbytes, self.handle = nbytes, handle
        self._finalizer = _no_atexit(weakref.finalize(self, release, handle, nbytes))

    def release(self) -> None:
        self._finalizer()


class VirtualRange:
    """A reserved span of virtual addresses [base, base + nbytes).

    Invariant: `mapped` holds exactly the chunks mapped into it, keyed by offset, and `starts`
    is its sorted key list. The reservation is freed (after unmapping every chunk) by `free()`
    or when the last reference goes; every tensor view's exporter references its range, so an
    address range can never be freed under a live view.
    """

    def __init__(self, base: int, nbytes: int, free: Callable[[int, int, dict], None]) -> None:
        self.base, self.nbytes = base, nbytes
        self.mapped: dict[int, PhysicalChunk] = {}
        self.starts: list[int] = []
        self._finalizer = _no_atexit(weakref.finalize(self, free, base, nbytes, self.mapped))

    def free(self) -> None:
        self._finalizer()

    @property
    def freed(self) -> bool:
        return not self._finalizer.alive

    def chunk_at(self, offset: int) -> tuple[int, PhysicalChunk] | None:
        """The mapped chunk containing byte `offset`, with its start offset, or None."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0:
            return None
        start = self.starts[i]
        chunk = self.mapped[start]
        return (start, chunk) if offset < start + chunk.nbytes else None

    def is_mapped(self, start: int, end: int) -> bool:
        """Whether every byte of [start, end) is backed by a mapped chunk."""
        while start < end:
            hit = self.chunk_at(start)
            if hit is None:
                return False
            start = hit[0] + hit[1].nbytes
        return True


class ViewRegistry:
    """Weak references to the exporters behind the tensor views of one address space.

    Invariant: an exporter is alive exactly while some tensor shares its storage, so a live
    weakref over a byte span means that span may still be read or written.
    """

    def __init__(self) -> None:
        self._refs: list[tuple[int, int, weakref.ref]] = []
        self._prune_at = 64

    def add(self, start: int, end: int, exporter: object) -> None:
        self._refs.append((start, end, weakref.ref(exporter)))
        if len(self._refs) >= self._prune_at:  # amortised: dead refs never pile up unbounded
            self._count(0, 0)
            self._prune_at = 2 * len(self._refs) + 64

    def live(self, start: int, end: int) -> int:
        """How many live views overlap [start, end)."""
        if self._count(start, end) == 0:
            return 0
        gc.collect()  # views trapped in reference cycles only die in a collection
        return self._count(start, end)

    def _count(self, start: int, end: int) -> int:
        self._refs = [r for r in self._refs if r[2]() is not None]
        return sum(1 for s, e, _ in self._refs if s < end and start < e)


class Backend:
    """Common checks and bookkeeping; subclasses supply the raw calls (`_map_one`, ...).

    Invariant: a range's bookkeeping (`mapped`/`starts`) always matches what is really mapped:
    a failed multi-chunk map is rolled back before the error propagates.
    """

    granularity: int
    total_bytes: int
    device: torch.device

    # -- raw calls a subclass implements (addresses are absolute) --
    def _reserve(self, nbytes: int) -> int: raise NotImplementedError
    def _free_range(self, base: int, nbytes: int, mapped: dict) -> None: raise NotImplementedError
    def _create(self, nbytes: int) -> Any: raise NotImplementedError
    def _release(self, handle: Any, nbytes: int) -> None: raise NotImplementedError
    def _map_one(self, addr: int, chunk: PhysicalChunk) -> None: raise NotImplementedError
    def _set_access(self, addr: int, nbytes: int) -> None: raise NotImplementedError
    def _unmap_one(self, addr: int, nbytes: int) -> None: raise NotImplementedError

    def _unmap_run(self, addr: int, nbytes: int, pieces: list[tuple[int, int]]) -> None:
        """Unmap adjacent chunks; backends that can do it in one call override this."""
        for piece_addr, piece_bytes in pieces:
            self._unmap_one(piece_addr, piece_bytes)
    def _view(self, addr: int, nbytes: int, owner: VirtualRange) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for in-flight device work that may read memory about to be unmapped."""

    def check_multiple(self, what: str, nbytes: int) -> None:
        if nbytes <= 0 or nbytes % self.granularity:
            raise ValueError(
                f"{what}={nbytes} must be a positive multiple of the granularity "
                f"{self.granularity} (align_up gives {align_up(max(nbytes, 1), self.granularity)})")

    def reserve(self, nbytes: int) -> VirtualRange:
        self.check_multiple("reserve nbytes", nbytes)
        return VirtualRange(self._reserve(nbytes), nbytes, self._free_range)

    def create_chunk(self, nbytes: int) -> PhysicalChunk:
        self.check_multiple("chunk nbytes", nbytes)
        return PhysicalChunk(nbytes, self._create(nbytes), self._release)

    def map(self, vrange: VirtualRange, offset: int, chunks: Sequence[PhysicalChunk]) -> None:
        """Map `chunks` back to back from `offset`, then grant read/write once for the run."""
        total = sum(c.nbytes for c in chunks)
        if not chunks:
            return
        self._check_span(vrange, offset, total)
        hit = vrange.chunk_at(offset)
        nxt = bisect.bisect_left(vrange.starts, offset)
        if hit or (nxt < len(vrange.starts) and vrange.starts[nxt] < offset + total):
            raise ValueError(f"map: [{offset}, {offset + total}) overlaps a mapped chunk")
        done: list[tuple[int, int]] = []
        addr = vrange.base + offset
        try:
            for chunk in chunks:
                self._map_one(addr, chunk)
                done.append((addr, chunk.nbytes))
                addr += chunk.nbytes
            self._set_access(vrange.base + offset, total)
        except BaseException:
            for addr, nbytes in done:  # leave the range as the bookkeeping says it is
                self._unmap_one(addr, nbytes)
            raise
        at = offset
        for chunk in chunks:
            vrange.mapped[at] = chunk
            bisect.insort(vrange.starts, at)
            at += chunk.nbytes

    def unmap(self, vrange: VirtualRange, offset: int, nbytes: int) -> list[PhysicalChunk]:
        """Unmap the whole chunks covering exactly [offset, offset + nbytes); returns them."""
        self._check_span(vrange, offset, nbytes)
        spans, at = [], offset
        while at < offset + nbytes:
            chunk = vrange.mapped.get(at)
            if chunk is None or at + chunk.nbytes > offset + nbytes:
                raise ValueError(
                    f"unmap: [{offset}, {offset + nbytes}) is not exactly a run of mapped "
                    f"chunks (no chunk fits at offset {at}); a chunk is unmapped whole")
            spans.append((at, chunk))
            at += chunk.nbytes
        self._unmap_run(vrange.base + offset, nbytes, [(vrange.base + at, c.nbytes) for at, c in spans])
        for at, chunk in spans:
            del vrange.mapped[at]
            vrange.starts.remove(at)
        return [chunk for _, chunk in spans]

    def view(self, vrange: VirtualRange, offset: int, nbytes: int) -> tuple[torch.Tensor, Any]:
        """A zero-copy uint8 tensor [nbytes] over mapped bytes, and its exporter object.

        Torch keeps the exporter alive for as long as any tensor shares the storage, and the
        exporter references `vrange`; a weakref to the exporter tells whether views live.
        """
        if nbytes <= 0 or offset < 0 or offset + nbytes > vrange.nbytes:
            raise ValueError(f"view: [{offset}, {offset + nbytes}) is outside the range")
        if not vrange.is_mapped(offset, offset + nbytes):
            raise ValueError(f"view: [{offset}, {offset + nbytes}) is not fully mapped")
        return self._view(vrange.base + offset, nbytes, vrange)

    def _check_span(self, vrange: VirtualRange, offset: int, nbytes: int) -> None:
        if vrange.freed:
            raise ValueError("the virtual range was already freed")
        if offset % self.granularity or nbytes % self.granularity:
            raise ValueError(
                f"offset {offset} and size {nbytes} must be multiples of the granularity "
                f"{self.granularity}")
        if offset < 0 or offset + nbytes > vrange.nbytes:
            raise ValueError(
                f"[{offset}, {offset + nbytes}) lies outside the reserved range of "
                f"{vrange.nbytes} bytes")


# Linux values (the host backend needs memfd_create, so it is Linux-only anyway).
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x1, 0x2, 0x10, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    # Python's mmap module cannot map at a fixed address, so call libc directly.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


def _os_error(call: str) -> VMMError:
    err = ctypes.get_errno()
    return VMMError(call, errno.errorcode.get(err, str(err)), os.strerror(err))


def _mmap(call: str, addr: int | None, nbytes: int, prot: int, flags: int, fd: int = -1) -> int:
    got = _libc().mmap(addr, nbytes, prot, flags, fd, 0)
    if got is None or got == _MAP_FAILED:
        raise _os_error(call)
    if addr is not None and got != addr:  # MAP_FIXED never moves; anything else is a bug
        raise VMMError(call, "EFAULT", f"mapped at {got:#x} instead of {addr:#x}")
    return got


@functools.lru_cache(maxsize=4096)
def _host_bytes_type(nbytes: int) -> type:
    # A Python subclass of a ctypes array exports the buffer protocol and, unlike the plain
    # array, accepts attributes (`owner`) and weak references.
    return type("HostBytes", (ctypes.c_uint8 * nbytes,), {})


class HostBackend(Backend):
    """Host memory with CUDA-VMM semantics: memfd chunks, PROT_NONE reservations, MAP_FIXED.

    Invariant: every byte of a reservation is either PROT_NONE (unmapped) or a MAP_SHARED view
    of exactly one chunk's memfd, and physical bytes created never exceed `total_bytes`.
    """

    def __init__(self, granularity: int | None = None, capacity_bytes: int | None = None) -> None:
        if not hasattr(os, "memfd_create") or not sys.platform.startswith("linux"):
            raise RuntimeError("HostBackend needs Linux (os.memfd_create and MAP_FIXED mmap)")
        page = mmap.PAGESIZE
        granularity = page if granularity is None else granularity
        if granularity <= 0 or granularity % page:
            raise ValueError(f"granularity={granularity} must be a positive multiple of the "
                             f"page size {page}")
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        capacity_bytes = physical if capacity_bytes is None else capacity_bytes
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes={capacity_bytes} must be positive")
        self.granularity, self.total_bytes = granularity, capacity_bytes
        self.device = torch.device("cpu")
        self.used_bytes = 0

    def _reserve(self, nbytes: int) -> int:
        # NORESERVE + PROT_NONE: address space only, no commit charge.
        return _mmap("mmap(reserve)", None, nbytes, _PROT_NONE,
                     _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE)

    def _free_range(self, base: int, nbytes: int, mapped: dict) -> None:
        if _libc().munmap(base, nbytes) != 0:
            raise _os_error("munmap")
        mapped.clear()

    def _create(self, nbytes: int) -> int:
        if self.used_bytes + nbytes > self.total_bytes:
            raise VMMError("create_chunk", "ENOMEM",
                           f"{nbytes} more bytes exceed the host backend's capacity of "
                           f"{self.total_bytes} ({self.used_bytes} in use)")
        fd = os.memfd_create("kunserve-chunk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
        except OSError:
            os.close(fd)
            raise
        self.used_bytes += nbytes
        return fd

    def _release(self, fd: int, nbytes: int) -> None:
        os.close(fd)  # pages go back once no mapping of the memfd remains either
        self.used_bytes -= nbytes

    def _map_one(self, addr: int, chunk: PhysicalChunk) -> None:
        _mmap("mmap(map)", addr, chunk.nbytes, _PROT_RW, _MAP_SHARED | _MAP_FIXED, chunk.handle)

    def _set_access(self, addr: int, nbytes: int) -> None:
        pass  # mmap already mapped the chunks read/write

    def _unmap_one(self, addr: int, nbytes: int) -> None:
        # Re-map PROT_NONE in place rather than munmap: the hole stays reserved for us.
        _mmap("mmap(unmap)", addr, nbytes, _PROT_NONE,
              _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED)

    def _view(self, addr: int, nbytes: int, owner: VirtualRange) -> tuple[torch.Tensor, Any]:
        exporter = _host_bytes_type(nbytes).from_address(addr)
        exporter.owner = owner
        return torch.frombuffer(exporter, dtype=torch.uint8), exporter  # [nbytes] uint8
