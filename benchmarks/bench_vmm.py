"""Host-backend unified memory: latency of drop and restore (memfd + MAP_FIXED remapping).

8 layers of 8 MiB at 2 MiB granularity (CUDA's), one chunk per layer; the chunks are never
touched, so this measures the remapping and bookkeeping alone.
"""

from __future__ import annotations

import pytest

from kunserve.runtime.vmm import HostBackend, UnifiedMemory, UnifiedMemoryConfig

GRANULARITY = 2 << 20
NUM_LAYERS, LAYER_BYTES = 8, 8 << 20
KEYS = [f"layers.{i}" for i in range(NUM_LAYERS)]


@pytest.fixture
def mem():
    backend = HostBackend(granularity=GRANULARITY, capacity_bytes=1 << 30)
    memory = UnifiedMemory(backend, UnifiedMemoryConfig(
        kv_block_bytes=2 << 20, initial_kv_bytes=64 << 20, max_kv_bytes=512 << 20,
        weights_reserve_bytes=256 << 20))
    for key in KEYS:
        memory.place_layer(key, LAYER_BYTES)
    yield memory
    memory.close()


def test_host_drop_restore_roundtrip(benchmark, mem):
    def roundtrip() -> None:
        mem.drop(KEYS)
        mem.restore(KEYS)

    benchmark(roundtrip)
    assert mem.dropped == []
    benchmark.extra_info["bytes_moved_each_way"] = NUM_LAYERS * LAYER_BYTES


def test_host_drop(benchmark, mem):
    def undo() -> None:
        if mem.dropped:
            mem.restore(KEYS)

    blocks = benchmark.pedantic(mem.drop, args=(KEYS,), setup=undo, rounds=200)
    assert blocks == (64 << 20) // (2 << 20) + NUM_LAYERS * 4


def test_host_restore(benchmark, mem):
    def redo() -> None:
        if not mem.dropped:
            mem.drop(KEYS)

    blocks = benchmark.pedantic(mem.restore, args=(KEYS,), setup=redo, rounds=200)
    assert blocks == (64 << 20) // (2 << 20)
