"""Unified virtual memory: layer weights and the KV cache carved from the same physical chunks.

Each layer's weights live in their own chunk(s) at a fixed place of a weights virtual range;
the KV cache is the mapped prefix of a large KV virtual range, block-major
(`[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`), so more bytes mapped at
its tail are more blocks. `drop(keys)` moves layers' chunks to the KV tail (no copy);
`restore(keys)` takes chunks back from the tail; the caller then reloads the weights.

Restore rule: restoring layers needing chunks of sizes S takes the last len(S) chunks of the
KV tail, whatever layer they were dropped from, provided their sizes are the same multiset as
S (all decoder layers have one size, so any order works for them; a differently sized layer,
e.g. an embedding, comes back only once it is at the tail again). The blocks lying even partly
on those chunks are `blocks_to_vacate(keys)`; the caller must stop using them and release
every KV view over them first.

Lifetime rule: every tensor view is made through a fresh exporter object that torch keeps
alive as long as any tensor shares the storage (slices, .view, .detach, indexing, numpy);
nothing is unmapped while such an exporter over it lives (RuntimeError instead), so a stale
view cannot exist.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Hashable, Iterable, Sequence

import attrs
import torch

from kunserve.runtime.vmm_cuda import CudaBackend, make_backend
from kunserve.runtime.vmm_host import (
    Backend, HostBackend, PhysicalChunk, ViewRegistry, VirtualRange, VMMError, align_down,
    align_up)

logger = logging.getLogger(__name__)

__all__ = [
    "Backend", "CudaBackend", "HostBackend", "LayerSlot", "PhysicalChunk", "UnifiedMemory",
    "UnifiedMemoryConfig", "VirtualRange", "VMMError", "align_down", "align_up", "make_backend",
]


def _int_at_least(low: int):
    def check(_inst, attr, value) -> None:
        if value is not None and (type(value) is not int or value < low):
            raise ValueError(f"{attr.name}={value!r} must be an int >= {low}")
    return check


@attrs.frozen
class UnifiedMemoryConfig:
    """Sizes in bytes. None means: the device's total memory (reservations), one chunk (KV).

    `initial_kv_bytes`, `max_kv_bytes`, `weights_reserve_bytes`, `kv_chunk_bytes` and
    `max_layer_chunk_bytes` must be multiples of the backend's granularity (checked against the
    backend by `UnifiedMemory`); reservations may not exceed the device's total memory.
    """

    kv_block_bytes: int = attrs.field(validator=_int_at_least(1))
    initial_kv_bytes: int = attrs.field(validator=_int_at_least(0))
    max_kv_bytes: int | None = attrs.field(default=None, validator=_int_at_least(1))
    weights_reserve_bytes: int | None = attrs.field(default=None, validator=_int_at_least(1))
    kv_chunk_bytes: int | None = attrs.field(default=None, validator=_int_at_least(1))
    max_layer_chunk_bytes: int | None = attrs.field(default=None, validator=_int_at_least(1))

    def resolved(self, granularity: int, total_bytes: int) -> UnifiedMemoryConfig:
        """This config with defaults filled in, checked against one backend."""
        device_max = align_down(total_bytes, granularity)
        cfg = attrs.evolve(
            self, max_kv_bytes=self.max_kv_bytes or device_max,
            weights_reserve_bytes=self.weights_reserve_bytes or device_max)
        for name in ("initial_kv_bytes", "max_kv_bytes", "weights_reserve_bytes",
                     "kv_chunk_bytes", "max_layer_chunk_bytes"):
            value = getattr(cfg, name)
            if value and value % granularity:
                raise ValueError(
                    f"{name}={value} is not a multiple of the granularity {granularity}; use "
                    f"align_down ({align_down(value, granularity)}) or align_up "
                    f"({align_up(value, granularity)})")
        for name in ("max_kv_bytes", "weights_reserve_bytes"):
            if getattr(cfg, name) > total_bytes:
                raise ValueError(f"{name}={getattr(cfg, name)} is more than the device has "
                                 f"({total_bytes} bytes); reserve at most {device_max}")
        if cfg.initial_kv_bytes > cfg.max_kv_bytes:
            raise ValueError(f"initial_kv_bytes={cfg.initial_kv_bytes} exceeds "
                             f"max_kv_bytes={cfg.max_kv_bytes}")
        return cfg


@attrs.define
class _Layer:
    key: Hashable
    offset: int  # fixed place in the weights range
    nbytes: int  # as asked; the chunks may round it up
    chunk_sizes: tuple[int, ...]
    chunks: list[PhysicalChunk] | None  # None while dropped
    views: ViewRegistry = attrs.field(factory=ViewRegistry)

    @property
    def span(self) -> int:
        return sum(self.chunk_sizes)


@attrs.frozen
class LayerSlot:
    """Where one layer's weights live; `view` gives zero-copy typed tensors into it."""

    memory: UnifiedMemory
    key: Hashable
    nbytes: int

    def view(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self.memory.layer_view(self.key, offset, shape, dtype)


class UnifiedMemory:
    """Layer weights and a growable KV cache over one backend's physical chunks.

    Invariant: the KV range is mapped contiguously over [0, kv_mapped_bytes): the base KV
    chunks first, then a stack of dropped-layer chunks in drop order (the tail is the top);
    each placed layer is either mapped at its fixed weights offset or dropped (its chunks on
    that stack); no byte is unmapped while a tensor view over it is alive. Not thread-safe.
    """

    def __init__(self, backend: Backend, config: UnifiedMemoryConfig) -> None:
        self.backend = backend
        self.config = config.resolved(backend.granularity, backend.total_bytes)
        self._weights = backend.reserve(self.config.weights_reserve_bytes)
        self._kv = backend.reserve(self.config.max_kv_bytes)
        self._layers: dict[Hashable, _Layer] = {}
        self._weights_end = 0
        self._kv_end = 0
        self._kv_stack: list[tuple[int, PhysicalChunk]] = []  # (KV offset, chunk), tail last
        self._base_kv_chunks: list[PhysicalChunk] = []
        self._kv_views = ViewRegistry()
        self._closed = False
        self._map_base_kv(self.config.initial_kv_bytes, self.config.kv_chunk_bytes)

    def _map_base_kv(self, nbytes: int, chunk_bytes: int | None) -> None:
        step = chunk_bytes or nbytes
        for at in range(0, nbytes, step):
            chunk = self.backend.create_chunk(min(step, nbytes - at))
            self.backend.map(self._kv, at, [chunk])
            self._base_kv_chunks.append(chunk)
        self._kv_end = nbytes

    # ---- sizes -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def kv_mapped_bytes(self) -> int:
        return self._kv_end

    @property
    def num_kv_blocks(self) -> int:
        return self._kv_end // self.config.kv_block_bytes

    @property
    def dropped(self) -> list[Hashable]:
        return [k for k, layer in self._layers.items() if layer.chunks is None]

    def set_kv_block_bytes(self, kv_block_bytes: int) -> None:
        """Count KV blocks of a new size (the caller re-views the KV range; bytes stay put)."""
        self.config = attrs.evolve(self.config, kv_block_bytes=kv_block_bytes)

    def drop_gain(self, keys: Iterable[Hashable]) -> int:
        """KV blocks that `drop(keys)` would add (freed bytes plus the old partial block)."""
        freed = sum(layer.span for layer in self._layers_in_state(keys, dropped=False))
        return (self._kv_end + freed) // self.config.kv_block_bytes - self.num_kv_blocks

    # ---- weights -----------------------------------------------------------------------
    def place_layer(self, key: Hashable, nbytes: int) -> LayerSlot:
        """Give layer `key` its own chunk(s), rounded up to the granularity, for its weights."""
        self._check_open()
        if key in self._layers:
            raise ValueError(f"layer {key!r} is already placed")
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"layer {key!r}: nbytes={nbytes!r} must be a positive int")
        sizes = self._chunk_sizes(nbytes)
        if self._weights_end + sum(sizes) > self._weights.nbytes:
            raise ValueError(f"out of reserved weights space placing layer {key!r}: "
                             f"raise weights_reserve_bytes ({self._weights.nbytes})")
        chunks = [self.backend.create_chunk(n) for n in sizes]
        self.backend.map(self._weights, self._weights_end, chunks)
        self._layers[key] = _Layer(key, self._weights_end, nbytes, sizes, chunks)
        self._weights_end += sum(sizes)
        return LayerSlot(self, key, nbytes)

    def _chunk_sizes(self, nbytes: int) -> tuple[int, ...]:
        span = align_up(nbytes, self.backend.granularity)
        step = self.config.max_layer_chunk_bytes or span
        return tuple(min(step, span - at) for at in range(0, span, step))

    def layer_view(self, key: Hashable, offset: int, shape: Sequence[int],
                   dtype: torch.dtype) -> torch.Tensor:
        """Zero-copy tensor `shape` of `dtype` at byte `offset` of layer `key`'s weights."""
        layer = self._layer(key)
        if layer.chunks is None:
            raise ValueError(f"layer {key!r} is dropped; restore it before viewing its weights")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset < 0 or offset + nbytes > layer.nbytes:
            raise ValueError(f"layer {key!r}: view [{offset}, {offset + nbytes}) exceeds its "
                             f"{layer.nbytes} bytes")
        return self._typed_view(self._weights, layer.views, layer.offset + offset, shape, dtype)

    # ---- KV cache ----------------------------------------------------------------------
    def kv_view(self, dtype: torch.dtype, block_shape: Sequence[int],
                num_blocks: int | None = None) -> torch.Tensor:
        """Tensor [num_blocks, *block_shape] over the first blocks of the KV range.

        `num_blocks` defaults to all mapped blocks. Re-take the view after drop/restore.
        """
        if math.prod(block_shape) * dtype.itemsize != self.config.kv_block_bytes:
            raise ValueError(f"block_shape {tuple(block_shape)} of {dtype} is not "
                             f"kv_block_bytes={self.config.kv_block_bytes} bytes")
        n = self.num_kv_blocks if num_blocks is None else num_blocks
        if not 0 <= n <= self.num_kv_blocks:
            raise ValueError(f"num_blocks={n} is outside [0, {self.num_kv_blocks}]")
        return self._typed_view(self._kv, self._kv_views, 0, (n, *block_shape), dtype)

    def _typed_view(self, vrange: VirtualRange, registry: ViewRegistry, offset: int,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        self._check_open()
        if offset % dtype.itemsize:
            raise ValueError(f"byte offset {offset} is not aligned to {dtype} "
                             f"({dtype.itemsize} bytes)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)
        raw, exporter = self.backend.view(vrange, offset, nbytes)  # [nbytes] uint8
        registry.add(offset, offset + nbytes, exporter)
        return raw.view(dtype).view(tuple(shape))

    # ---- drop / restore ----------------------------------------------------------------
    def drop(self, keys: Iterable[Hashable]) -> int:
        """Move layers' chunks to the KV tail; returns the new number of KV blocks."""
        layers = self._layers_in_state(keys, dropped=False)
        if not layers:
            return self.num_kv_blocks
        freed = sum(layer.span for layer in layers)
        if self._kv_end + freed > self._kv.nbytes:
            raise ValueError(f"out of reserved KV space: {self._kv_end} mapped + {freed} "
                             f"dropped > {self._kv.nbytes} reserved; raise max_kv_bytes")
        for layer in layers:
            self._refuse_live_views(layer.views, 0, self._weights.nbytes,
                                    f"drop layer {layer.key!r}")
        old = self.num_kv_blocks
        self.backend.synchronize()
        chunks = self._unmap_layers(layers)
        try:
            self.backend.map(self._kv, self._kv_end, chunks)
        except BaseException:
            self._map_layers(layers, chunks)  # put the weights back where they were
            raise
        for chunk in chunks:
            self._kv_stack.append((self._kv_end, chunk))
            self._kv_end += chunk.nbytes
        for layer in layers:
            layer.chunks = None
        logger.info("dropped %d layer(s), %d bytes: KV blocks %d -> %d", len(layers), freed,
                    old, self.num_kv_blocks)
        return self.num_kv_blocks

    def blocks_to_vacate(self, keys: Iterable[Hashable]) -> list[int]:
        """KV block ids lying (even partly) on the chunks `restore(keys)` would take back."""
        layers = self._layers_in_state(keys, dropped=True)
        if not layers:
            return []
        start = self._tail_for(layers)[0][0]
        return list(range(start // self.config.kv_block_bytes, self.num_kv_blocks))

    def restore_order(self, keys: Iterable[Hashable]) -> list[Hashable]:
        """The dropped ``keys`` in an order in which restoring them one at a time always takes
        chunks from the top of the KV tail (LIFO by chunk sizes, as ``restore`` requires)."""
        pending = list(self._layers_in_state(keys, dropped=True))
        sizes = [chunk.nbytes for _, chunk in self._kv_stack]
        order = []
        while pending:
            for layer in pending:
                n = len(layer.chunk_sizes)
                if sorted(sizes[len(sizes) - n:]) == sorted(layer.chunk_sizes):
                    order.append(layer.key)
                    pending.remove(layer)
                    del sizes[len(sizes) - n:]
                    break
            else:
                raise ValueError(f"layers {[layer.key for layer in pending]} cannot be restored one at a time "
                                 f"from the KV tail; restore them together")
        return order

    def restore(self, keys: Iterable[Hashable]) -> int:
        """Take tail chunks back into the layers' places; returns the new KV block count.

        The caller must have vacated `blocks_to_vacate(keys)` and released every KV view over
        them; it reloads the layers' weights afterwards (their contents are undefined).
        """
        layers = self._layers_in_state(keys, dropped=True)
        if not layers:
            return self.num_kv_blocks
        tail = self._tail_for(layers)
        start = tail[0][0]
        first = start // self.config.kv_block_bytes
        self._refuse_live_views(self._kv_views, start, self._kv_end,
                                f"restore: KV blocks {first}..{self.num_kv_blocks - 1}")
        self.backend.synchronize()
        chunks = self.backend.unmap(self._kv, start, self._kv_end - start)
        by_size: dict[int, list[PhysicalChunk]] = {}
        for chunk in chunks:
            by_size.setdefault(chunk.nbytes, []).append(chunk)
        assigned = [by_size[n].pop() for layer in layers for n in layer.chunk_sizes]
        try:
            self._map_layers(layers, assigned)
        except BaseException:
            self.backend.map(self._kv, start, chunks)  # the KV tail is as it was
            raise
        del self._kv_stack[len(self._kv_stack) - len(tail):]
        self._kv_end = start
        logger.info("restored %d layer(s): KV blocks -> %d", len(layers), self.num_kv_blocks)
        return self.num_kv_blocks

    def _tail_for(self, layers: list[_Layer]) -> list[tuple[int, PhysicalChunk]]:
        need = sorted(n for layer in layers for n in layer.chunk_sizes)
        tail = self._kv_stack[len(self._kv_stack) - len(need):]
        have = sorted(chunk.nbytes for _, chunk in tail)
        if have != need:
            raise ValueError(
                f"restore takes chunks back from the KV tail (LIFO): layers "
                f"{[layer.key for layer in layers]} need chunk sizes {need} but the last "
                f"{len(need)} tail chunks have sizes {have}; restore in reverse drop order")
        return tail

    def _unmap_layers(self, layers: list[_Layer]) -> list[PhysicalChunk]:
        """Unmap the layers' chunks from the weights range (all or, on error, none)."""
        chunks: list[PhysicalChunk] = []
        for i, layer in enumerate(layers):
            try:
                chunks += self.backend.unmap(self._weights, layer.offset, layer.span)
            except BaseException:
                self._map_layers(layers[:i], chunks)
                raise
        return chunks

    def _map_layers(self, layers: list[_Layer], chunks: list[PhysicalChunk]) -> None:
        """Map `chunks`, in order, at the layers' places (all or, on error, none)."""
        ends = list(itertools.accumulate(len(layer.chunk_sizes) for layer in layers))
        parts = [chunks[end - len(layer.chunk_sizes):end] for layer, end in zip(layers, ends)]
        for i, (layer, mine) in enumerate(zip(layers, parts)):
            try:
                self.backend.map(self._weights, layer.offset, mine)
            except BaseException:
                for done in layers[:i]:
                    self.backend.unmap(self._weights, done.offset, done.span)
                raise
        for layer, mine in zip(layers, parts):
            layer.chunks = mine

    # ---- checks and lifetime -----------------------------------------------------------
    def _layer(self, key: Hashable) -> _Layer:
        layer = self._layers.get(key)
        if layer is None:
            known = list(self._layers)[:8]
            raise ValueError(f"unknown layer key {key!r} (placed: {known}"
                             f"{' ...' if len(self._layers) > 8 else ''})")
        return layer

    def _layers_in_state(self, keys: Iterable[Hashable], dropped: bool) -> list[_Layer]:
        self._check_open()
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate layer keys in {keys}")
        layers = [self._layer(k) for k in keys]
        for layer in layers:
            if (layer.chunks is None) != dropped:
                state = "already dropped" if not dropped else "not dropped; nothing to restore"
                raise ValueError(f"layer {layer.key!r} is {state}")
        return layers

    @staticmethod
    def _refuse_live_views(registry: ViewRegistry, start: int, end: int, what: str) -> None:
        n = registry.live(start, end)
        if n:
            raise RuntimeError(f"cannot {what}: {n} live tensor view(s) still cover that "
                               "memory; release all tensors viewing it first (including "
                               "slices, .view()s and .detach()es of them)")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this UnifiedMemory is closed")

    def close(self) -> None:
        """Unmap and free everything; refuses (RuntimeError) while any view is alive."""
        if self._closed:
            return
        self._refuse_live_views(self._kv_views, 0, self._kv.nbytes, "close: KV cache")
        for layer in self._layers.values():
            self._refuse_live_views(layer.views, 0, self._weights.nbytes,
                                    f"close: layer {layer.key!r}")
        self.backend.synchronize()
        self._weights.free()
        self._kv.free()
        placed = [c for layer in self._layers.values() for c in layer.chunks or ()]
        for chunk in self._base_kv_chunks + placed + [c for _, c in self._kv_stack]:
            chunk.release()
        self._closed = True

    def __enter__(self) -> UnifiedMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
