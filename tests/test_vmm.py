"""Unified virtual memory on the host backend: real memfd/mmap remapping, tiny sizes.

Every size derives from the backend's granularity, so test_vmm_cuda.py re-runs the tests not
named `test_host_*` unchanged on the CUDA backend (2 MiB granularity). The host granularity is
64 KiB, larger than a page, to mimic CUDA's coarse chunks at tiny sizes.
"""

from __future__ import annotations

import gc

import pytest
import torch

from kunserve.runtime.vmm import (
    HostBackend, UnifiedMemory, UnifiedMemoryConfig, VMMError)

NUM_LAYERS = 4
# One KV block: [num_layers=2, 2, block_size=4, num_kv_heads=2, head_dim=12] fp32 = 1536 bytes,
# which does not divide the granularity, so partial tail blocks are exercised.
BLOCK_SHAPE = (2, 2, 4, 2, 12)
BLOCK_BYTES = 2 * 2 * 4 * 2 * 12 * 4


@pytest.fixture
def backend():
    return HostBackend(granularity=64 * 1024, capacity_bytes=64 << 20)


def layer_bytes(g: int) -> int:
    return g + g // 2 + 100  # not a granule multiple: placement rounds it up to 2 granules


def chunk_bytes(nbytes: int, g: int) -> int:
    return -(-nbytes // g) * g  # the test's own rounding, independent of the module's


def make_mem(backend, initial_granules=2, max_granules=32, extra=None, **cfg) -> UnifiedMemory:
    g = backend.granularity
    mem = UnifiedMemory(backend, UnifiedMemoryConfig(
        kv_block_bytes=BLOCK_BYTES, initial_kv_bytes=initial_granules * g,
        max_kv_bytes=max_granules * g, weights_reserve_bytes=32 * g, **cfg))
    for i in range(NUM_LAYERS):
        mem.place_layer(f"layers.{i}", layer_bytes(g))
    for key, nbytes in (extra or {}).items():
        mem.place_layer(key, nbytes)
    return mem


def random_weights(g: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = layer_bytes(g) // 4
    return {f"layers.{i}": torch.randn(n, generator=gen) for i in range(NUM_LAYERS)}


def load(mem: UnifiedMemory, weights: dict[str, torch.Tensor]) -> None:
    for key, w in weights.items():
        mem.layer_view(key, 0, w.shape, w.dtype).copy_(w)  # the view dies at once


def kv(mem: UnifiedMemory, **kw) -> torch.Tensor:
    return mem.kv_view(torch.float32, BLOCK_SHAPE, **kw)  # [num_blocks, *BLOCK_SHAPE]


@pytest.mark.parametrize("k", [1, 2, NUM_LAYERS])
def test_drop_grows_kv_by_predicted_blocks(backend, k):
    g = backend.granularity
    mem = make_mem(backend)
    assert mem.num_kv_blocks == 2 * g // BLOCK_BYTES
    expected = (2 * g + k * chunk_bytes(layer_bytes(g), g)) // BLOCK_BYTES
    keys = [f"layers.{i}" for i in range(k)]
    assert mem.drop_gain(keys) == expected - mem.num_kv_blocks
    assert mem.drop(keys) == expected == mem.num_kv_blocks
    assert kv(mem).shape == (expected, *BLOCK_SHAPE)
    assert sorted(mem.dropped) == keys
    mem.close()


def test_drop_keeps_existing_kv_data(backend):
    mem = make_mem(backend)
    old = kv(mem)
    before = torch.randn(old.shape, device=old.device)
    old.copy_(before)
    n1 = mem.drop(["layers.0"])
    new = kv(mem)
    assert torch.equal(old, before)  # the old view still covers still-mapped memory
    assert torch.equal(new[:before.shape[0]], before)
    grown = torch.randn(new.shape, device=new.device)
    new.copy_(grown)
    del old, new
    mem.drop(["layers.2", "layers.1"])  # a second grow keeps the blocks of the first one
    assert torch.equal(kv(mem)[:n1], grown)
    mem.close()


def test_drop_moves_memory_without_copy(backend):
    g = backend.granularity
    mem = make_mem(backend)
    mem.layer_view("layers.1", 0, (g,), torch.uint8).fill_(7)
    start = mem.kv_mapped_bytes
    mem.drop(["layers.1"])
    raw = mem.kv_view(torch.uint8, (BLOCK_BYTES,)).view(-1)  # [num_blocks * BLOCK_BYTES]
    assert bool((raw[start:start + g] == 7).all())  # the very same physical bytes
    del raw
    mem.close()


def test_restore_then_reload_is_bit_identical_to_fresh_load(backend):
    g = backend.granularity
    weights = random_weights(g, seed=0)
    mem = make_mem(backend)
    load(mem, weights)
    blocks = mem.num_kv_blocks
    mem.drop(["layers.1", "layers.3"])
    scribble = kv(mem)
    scribble.fill_(float("nan"))  # KV traffic overwrites the dropped layers' memory
    del scribble
    assert mem.restore(["layers.3", "layers.1"]) == blocks
    load(mem, {k: weights[k] for k in ("layers.1", "layers.3")})
    fresh = make_mem(backend)
    load(fresh, weights)
    for key, w in weights.items():
        got = mem.layer_view(key, 0, w.shape, torch.int32).cpu()  # compare bits, not values
        assert torch.equal(got, w.view(torch.int32))
        assert torch.equal(got, fresh.layer_view(key, 0, w.shape, torch.int32).cpu())
        del got  # on the host .cpu() is the view itself
    assert mem.dropped == []
    mem.close()
    fresh.close()


def test_blocks_to_vacate_are_exactly_the_tail_blocks(backend):
    g = backend.granularity
    span = chunk_bytes(layer_bytes(g), g)
    mem = make_mem(backend)
    mem.drop(["layers.0"])
    mem.drop(["layers.2"])
    total = (2 * g + 2 * span) // BLOCK_BYTES
    tail = list(range((2 * g + span) // BLOCK_BYTES, total))
    assert mem.blocks_to_vacate(["layers.2"]) == tail
    # Same-size layers are interchangeable: restoring layers.0 takes the tail chunk too.
    assert mem.blocks_to_vacate(["layers.0"]) == mem.blocks_to_vacate(["layers.2"])
    both = list(range(2 * g // BLOCK_BYTES, total))
    assert mem.blocks_to_vacate(["layers.0", "layers.2"]) == both
    assert mem.restore(["layers.0"]) == (2 * g + span) // BLOCK_BYTES
    assert mem.dropped == ["layers.2"]
    mem.close()


def test_restore_is_lifo_for_differently_sized_layers(backend):
    g = backend.granularity
    mem = make_mem(backend, extra={"embed": 3 * g})
    mem.drop(["embed"])
    mem.drop(["layers.0"])
    with pytest.raises(ValueError, match="LIFO"):
        mem.blocks_to_vacate(["embed"])
    with pytest.raises(ValueError, match="reverse drop order"):
        mem.restore(["embed"])
    mem.restore(["layers.0"])
    expected = list(range(2 * g // BLOCK_BYTES, 5 * g // BLOCK_BYTES))
    assert mem.blocks_to_vacate(["embed"]) == expected
    mem.restore(["embed"])
    mem.close()


def test_restore_order_takes_units_back_one_at_a_time(backend):
    g = backend.granularity
    mem = make_mem(backend, extra={"embed": 3 * g})
    mem.drop(["embed", "layers.1"])
    mem.drop(["layers.0"])
    order = mem.restore_order(["embed", "layers.0", "layers.1"])
    assert order[0] in ("layers.0", "layers.1") and order[-1] == "embed"  # sizes match the tail top down
    for key in order:
        mem.restore([key])  # each one alone: never the LIFO error
    assert mem.dropped == []
    mem.close()


def test_multi_chunk_layers_drop_and_restore(backend):
    g = backend.granularity
    mem = make_mem(backend, max_layer_chunk_bytes=g)  # each layer: 2 chunks of 1 granule
    weights = random_weights(g, seed=1)
    load(mem, weights)
    assert mem.drop(["layers.1", "layers.2"]) == (6 * g) // BLOCK_BYTES
    mem.restore(["layers.1", "layers.2"])
    load(mem, weights)
    for key, w in weights.items():
        assert torch.equal(mem.layer_view(key, 0, w.shape, w.dtype).cpu(), w)
    mem.close()


VIEW_TRANSFORMS = {
    "slice": lambda t: t[3:10],
    "view": lambda t: t.view(-1, 2),
    "detach": lambda t: t.detach(),
    "index": lambda t: t[5],
    "dtype_view": lambda t: t.view(torch.int32),
    "as_strided": lambda t: t.as_strided((4,), (2,)),
    "numpy": lambda t: t.numpy(),
}


@pytest.mark.parametrize("transform", list(VIEW_TRANSFORMS))
def test_live_weight_view_blocks_drop(backend, transform):
    if transform == "numpy" and backend.device.type != "cpu":
        pytest.skip("numpy views exist for host memory only")
    mem = make_mem(backend)
    view = mem.layer_view("layers.1", 0, (64,), torch.float32)
    view.fill_(1.5)
    derived = VIEW_TRANSFORMS[transform](view)
    del view  # only the derived tensor keeps the exporter alive
    with pytest.raises(RuntimeError, match="release all tensors viewing it first"):
        mem.drop(["layers.1"])
    assert mem.dropped == []
    float(torch.as_tensor(derived).sum())  # still mapped and readable: no segfault
    del derived
    mem.drop(["layers.1"])
    with pytest.raises(ValueError, match="is dropped; restore it"):
        mem.layer_view("layers.1", 0, (64,), torch.float32)
    mem.close()


def test_views_of_other_layers_do_not_block_drop(backend):
    mem = make_mem(backend)
    other = mem.layer_view("layers.0", 0, (8,), torch.float32)
    mem.drop(["layers.1"])
    other.fill_(2.0)
    del other
    mem.close()


def test_view_in_reference_cycle_is_collected_before_refusing(backend):
    mem = make_mem(backend)
    cycle: list = [mem.layer_view("layers.2", 0, (8,), torch.float32)]
    cycle.append(cycle)
    del cycle
    mem.drop(["layers.2"])
    mem.close()


def test_live_kv_view_blocks_restore(backend):
    mem = make_mem(backend)
    kept = mem.num_kv_blocks
    mem.drop(["layers.3"])
    block = kv(mem)[-1]  # one block on the tail chunk, via a slice
    with pytest.raises(RuntimeError, match=r"restore: KV blocks .*release all tensors"):
        mem.restore(["layers.3"])
    block.fill_(3.0)  # still mapped
    del block
    head = kv(mem, num_blocks=kept)  # a view of the surviving blocks alone does not block
    mem.restore(["layers.3"])
    head.fill_(1.0)
    del head
    mem.close()


def test_close_refuses_live_views_and_gc_keeps_views_valid(backend):
    mem = make_mem(backend)
    view = kv(mem)
    with pytest.raises(RuntimeError, match="close: KV cache"):
        mem.close()
    del mem
    gc.collect()
    view.fill_(4.0)  # the exporter keeps the mapping alive after the allocator is gone
    assert float(view[0].sum()) == 4.0 * view[0].numel()
    del view
    gc.collect()
    if isinstance(backend, HostBackend):  # the last view took the whole mapping with it
        assert backend.used_bytes == 0


def test_state_errors(backend):
    mem = make_mem(backend)
    with pytest.raises(ValueError, match="unknown layer key 'nope'"):
        mem.drop(["nope"])
    with pytest.raises(ValueError, match="duplicate layer keys"):
        mem.drop(["layers.0", "layers.0"])
    with pytest.raises(ValueError, match="not dropped; nothing to restore"):
        mem.restore(["layers.0"])
    mem.drop(["layers.0"])
    with pytest.raises(ValueError, match="'layers.0' is already dropped"):
        mem.drop(["layers.0", "layers.1"])
    assert mem.dropped == ["layers.0"]  # a refused call changes nothing
    with pytest.raises(ValueError, match="already placed"):
        mem.place_layer("layers.1", 10)
    with pytest.raises(ValueError, match="exceeds its"):
        mem.layer_view("layers.1", 0, (layer_bytes(backend.granularity),), torch.float32)
    with pytest.raises(ValueError, match="is not kv_block_bytes"):
        mem.kv_view(torch.bfloat16, BLOCK_SHAPE)
    mem.close()
    with pytest.raises(RuntimeError, match="closed"):
        mem.drop(["layers.1"])


def test_out_of_reserved_kv_space(backend):
    mem = make_mem(backend, initial_granules=2, max_granules=5)
    mem.drop(["layers.0"])
    with pytest.raises(ValueError, match="out of reserved KV space"):
        mem.drop(["layers.1"])
    mem.close()


def test_granularity_and_reservation_errors(backend):
    g = backend.granularity
    with pytest.raises(ValueError, match="not a multiple of the granularity"):
        UnifiedMemory(backend, UnifiedMemoryConfig(kv_block_bytes=BLOCK_BYTES,
                                                   initial_kv_bytes=g + 4096))
    with pytest.raises(ValueError, match="more than the device has"):
        UnifiedMemory(backend, UnifiedMemoryConfig(
            kv_block_bytes=BLOCK_BYTES, initial_kv_bytes=0,
            max_kv_bytes=(backend.total_bytes // g + 1) * g))
    with pytest.raises(ValueError, match="must be an int >= 1"):
        UnifiedMemoryConfig(kv_block_bytes=0, initial_kv_bytes=0)
    with pytest.raises(ValueError, match="multiple of the granularity"):
        backend.create_chunk(g + 1)
    vrange = backend.reserve(4 * g)
    chunk = backend.create_chunk(g)
    with pytest.raises(ValueError, match="multiples of the granularity"):
        backend.map(vrange, g // 2, [chunk])
    backend.map(vrange, g, [chunk])
    with pytest.raises(ValueError, match="overlaps a mapped chunk"):
        backend.map(vrange, g, [chunk])
    with pytest.raises(ValueError, match="not fully mapped"):
        backend.view(vrange, 0, 2 * g)
    with pytest.raises(ValueError, match="unmapped whole"):
        backend.unmap(vrange, 0, 2 * g)
    backend.unmap(vrange, g, g)
    vrange.free()


def test_host_backend_config_errors():
    with pytest.raises(ValueError, match="multiple of the page size"):
        HostBackend(granularity=1000)
    with pytest.raises(ValueError, match="capacity_bytes"):
        HostBackend(capacity_bytes=0)


def test_host_capacity_and_os_errors_name_the_code(backend):
    g = backend.granularity
    with pytest.raises(VMMError, match="create_chunk failed with ENOMEM") as info:
        backend.create_chunk((backend.total_bytes // g + 1) * g)
    assert info.value.code == "ENOMEM"
    chunk = backend.create_chunk(g)
    chunk.release()  # its memfd is closed: mapping it must fail in the OS, cleanly
    vrange = backend.reserve(g)
    with pytest.raises(VMMError, match=r"mmap\(map\) failed with EBADF"):
        backend.map(vrange, 0, [chunk])
    vrange.free()
    assert backend.used_bytes == 0
