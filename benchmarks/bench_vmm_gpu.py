"""CUDA unified memory: drop and restore latency vs bytes of weights moved (a plain script).

For each weight total (default 1, 4, 16 GiB) and per-layer chunk size (default 512 MiB and
2 GiB), places total/chunk layers of one chunk each, then times `drop(all layers)` (weights ->
KV tail) and `restore(all layers)` (KV tail -> weights), each including the device
synchronize that precedes the unmaps. Also times the raw driver calls on one chunk, to show
where the time goes. Prints a table, then one JSON line.

    python benchmarks/bench_vmm_gpu.py [--sizes-gib 1 4 16] [--chunk-mib 512 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kunserve.runtime.vmm import CudaBackend, UnifiedMemory, UnifiedMemoryConfig

GIB, MIB = 1 << 30, 1 << 20


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": 1e3 * statistics.median(ordered), "min_ms": 1e3 * ordered[0],
            "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))]}


def time_drop_restore(backend: CudaBackend, total: int, chunk: int, repeats: int) -> dict:
    """Median/min/p90 of drop and restore of total/chunk one-chunk layers."""
    g = backend.granularity
    cfg = UnifiedMemoryConfig(
        kv_block_bytes=2 * MIB, initial_kv_bytes=GIB,  # an 8B model's block (16 tokens) is 2 MiB
        max_kv_bytes=backend.total_bytes // g * g, weights_reserve_bytes=(total // g + 1) * g)
    keys = [f"layers.{i}" for i in range(total // chunk)]
    drops, restores = [], []
    with UnifiedMemory(backend, cfg) as mem:
        for key in keys:
            mem.place_layer(key, chunk)
        blocks = mem.num_kv_blocks
        for i in range(repeats + 3):  # 3 warm-up rounds
            t0 = time.perf_counter()
            grown = mem.drop(keys)
            t1 = time.perf_counter()
            mem.restore(keys)
            t2 = time.perf_counter()
            if i >= 3:
                drops.append(t1 - t0)
                restores.append(t2 - t1)
        assert grown == blocks + total // (2 * MIB), (grown, blocks)
    return {"weights_gib": total / GIB, "chunk_mib": chunk // MIB, "num_chunks": len(keys),
            "kv_blocks_before": blocks, "kv_blocks_after_drop": grown,
            "drop": _ms(drops), "restore": _ms(restores)}


def time_raw_calls(backend: CudaBackend, chunk: int, repeats: int) -> dict:
    """Median ms of cuMemMap, cuMemSetAccess, cuMemUnmap on one chunk of `chunk` bytes."""
    vrange = backend.reserve(chunk)
    phys = backend.create_chunk(chunk)
    times: dict[str, list[float]] = {"cuMemMap": [], "cuMemSetAccess": [], "cuMemUnmap": []}
    for _ in range(repeats):
        for name, call in (("cuMemMap", lambda: backend._map_one(vrange.base, phys)),
                           ("cuMemSetAccess", lambda: backend._set_access(vrange.base, chunk)),
                           ("cuMemUnmap", lambda: backend._unmap_one(vrange.base, chunk))):
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    vrange.free()
    phys.release()
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gib", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--chunk-mib", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    backend = CudaBackend()
    rows = [time_drop_restore(backend, size * GIB, chunk * MIB, args.repeats)
            for chunk in args.chunk_mib for size in args.sizes_gib if chunk * MIB <= size * GIB]
    raw = {f"{c}MiB": time_raw_calls(backend, c * MIB, args.repeats) for c in args.chunk_mib}
    device = torch.cuda.get_device_name(backend.device)
    print(f"device: {device}, granularity {backend.granularity // MIB} MiB, "
          f"torch {torch.__version__}")
    print(f"{'weights':>8} {'chunk':>9} {'chunks':>6} {'drop med':>9} {'drop min':>9} "
          f"{'rest. med':>9} {'rest. min':>9} {'GB/ms drop':>10}")
    for r in rows:
        print(f"{r['weights_gib']:>6.0f}Gi {r['chunk_mib']:>6}MiB {r['num_chunks']:>6} "
              f"{r['drop']['median_ms']:>9.3f} {r['drop']['min_ms']:>9.3f} "
              f"{r['restore']['median_ms']:>9.3f} {r['restore']['min_ms']:>9.3f} "
              f"{r['weights_gib'] * GIB / 1e9 / r['drop']['median_ms']:>10.1f}")
    for chunk, calls in raw.items():
        print(f"raw calls on one {chunk} chunk (median ms): "
              + ", ".join(f"{k} {v:.3f}" for k, v in calls.items()))
    print(json.dumps({"bench": "vmm_gpu", "device": device, "rows": rows, "raw_calls": raw}))


if __name__ == "__main__":
    main()
