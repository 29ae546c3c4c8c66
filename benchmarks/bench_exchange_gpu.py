"""KV exchange over NCCL between two GPUs (issue 11): the runtime's ``KVExchange`` rounds against
the link's own point-to-point bandwidth, and an activation's latency with and without a KV round
in flight.

    torchrun --nproc-per-node 2 benchmarks/bench_exchange_gpu.py [--model qwen2.5-14b] [--out x.json]

Both ranks hold Qwen-2.5-14B-shaped KV pages of half the layers (what each member keeps after a
2-way merge: 24 of 48 layers, 16 tokens a page); each sends the other the pages of its requests'
peer layers, as after a merge. Timed with CUDA events and synchronisation on both ranks; rank 0
prints one JSON line (and writes it to ``--out``). On CPU (gloo) it runs too, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

from kunserve.bench._model_configs import MODEL_CONFIGS
from kunserve.policy.exchange import PageTransfer, schedule_exchange
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.kv_exchange import KVExchange, outbound_owner
from kunserve.runtime.transport import activation_group, init_cluster_groups


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, both ranks starting together."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def p2p_bandwidth(nbytes: int, device, repeats: int) -> dict:
    """Bytes per second one way (rank 0 -> 1) and each way at once (both send, both receive)."""
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    out = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    into = torch.empty_like(out)

    def one_way():
        op = dist.isend(out, peer) if rank == 0 else dist.irecv(into, peer)
        op.wait()

    def both_ways():
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer), dist.P2POp(dist.irecv, into, peer)]):
            work.wait()

    one_way(), both_ways()  # warm-up: NCCL connects the pair
    return {"bytes": nbytes, "one_way_GBps": nbytes / timed(one_way, device, repeats) / 1e9,
            "both_ways_GBps_per_direction": nbytes / timed(both_ways, device, repeats) / 1e9}


def exchange_rounds(page_shape, pages_per_rank: int, chunk_pages: int, device, dtype) -> dict:
    """Every page of each rank's outbound requests to the peer, in rounds of ``chunk_pages``
    pages per link (``schedule_exchange``), run by ``KVExchange.run_round``."""
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    requests, per_request = 16, pages_per_rank // 16
    pool = 2 * pages_per_rank + chunk_pages
    storage = torch.zeros((pool, *page_shape), dtype=dtype, device=device)
    bm = BlockManager(pool, 16)
    for i in range(requests):
        bm.allocate(outbound_owner(peer, f"r{rank}-{i}"), per_request * 16)
    transfers = [PageTransfer(f"r{src}-{i}", src, 1 - src, per_request) for src in (0, 1) for i in range(requests)]
    schedule = schedule_exchange(transfers, {0: pages_per_rank, 1: pages_per_rank}, {0: pool, 1: pool}, chunk_pages)
    exchange = KVExchange(rank, schedule, SimpleNamespace(storage=storage), bm)
    exchange.run_round()  # warm-up round (connects the pair, allocates NCCL buffers)
    sync(device)
    start = time.perf_counter()
    round_times = []
    while not exchange.done:
        t = time.perf_counter()
        exchange.run_round()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        round_times.append(time.perf_counter() - t)
    sync(device)
    elapsed = time.perf_counter() - start
    page_bytes = storage[0].numel() * storage.element_size()
    moved = (schedule.num_rounds - 1) * chunk_pages * page_bytes  # per direction, after the warm-up round
    return {"chunk_pages": chunk_pages, "chunk_MB": chunk_pages * page_bytes / 1e6, "rounds": len(round_times),
            "round_ms_median": 1e3 * sorted(round_times)[len(round_times) // 2],
            "GBps_per_direction": moved / elapsed / 1e9}


def activation_latency(hidden_shape, kv_bytes: int, device, dtype, repeats: int) -> dict:
    """Seconds until a step's hidden states [tokens, hidden] reach the next stage (rank 0 -> 1,
    on the activation communicator): alone; posted *after* a KV chunk of ``kv_bytes`` each way on
    the default group (uncoordinated); posted *before* it (the runtime's order)."""
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    hidden = torch.ones(hidden_shape, dtype=dtype, device=device)
    kv_out = torch.ones(kv_bytes // 2, dtype=torch.bfloat16, device=device)
    kv_in = torch.empty_like(kv_out)
    group = activation_group()

    def activation():
        work = dist.isend(hidden, peer, group=group) if rank == 0 else dist.irecv(hidden, peer, group=group)
        return work

    def kv_round():
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, kv_out, peer), dist.P2POp(dist.irecv, kv_in, peer)])

    def measure(order: str) -> float:
        sync(device)
        start = time.perf_counter()
        if order == "alone":
            act = activation()
            kv = []
        elif order == "kv-first":
            kv = kv_round()
            act = activation()
        else:
            act = activation()
            kv = kv_round()
        act.wait()
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the activation's bytes have landed
        took = time.perf_counter() - start
        for work in kv:
            work.wait()
        return took

    out = {}
    for order in ("alone", "kv-first", "activation-first"):
        measure(order)  # warm-up
        samples = sorted(measure(order) for _ in range(repeats))
        out[f"{order}_ms"] = 1e3 * samples[len(samples) // 2]
    return {"hidden_MB": hidden.numel() * hidden.element_size() / 1e6, "kv_MB": kv_bytes / 1e6, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-14b", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--pages", type=int, default=2048, help="KV pages each rank sends (16 tokens each)")
    p.add_argument("--chunk-pages", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--p2p-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    init_cluster_groups()
    if dist.get_world_size() != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    cfg = MODEL_CONFIGS[args.model]
    layers = cfg["num_hidden_layers"] // 2
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    page_shape = (layers, 2, 16, cfg["num_key_value_heads"], head_dim)  # one page of half the layers
    dtype = torch.bfloat16
    pages = args.pages if cuda else 64
    result = {"bench": "exchange_gpu", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "model": args.model, "page_MB": torch.tensor(page_shape).prod().item() * 2 / 1e6,
              "p2p": p2p_bandwidth((args.p2p_mb if cuda else 8) * 2**20, device, args.repeats),
              "exchange": [exchange_rounds(page_shape, pages, c, device, dtype)
                           for c in (args.chunk_pages if cuda else [8, 32])],
              "activation": [activation_latency((tokens, cfg["hidden_size"]), kv_mb * 2**20, device, dtype, args.repeats)
                             for tokens, kv_mb in ((256, 96), (2048, 96), (2048, 384))]}
    if dist.get_rank() == 0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
