"""Decode step time of a Llama-3-8B-shaped model (dummy bf16 weights) against the bandwidth floor.

A plain script (no pytest tests here). For each batch size B (default 1, 32, 128, 256) with
every sequence at context ``--context`` (default 1024), it places B running requests in the
engine's block manager (the KV cache filled with random values), then times:

* ``graph``: one replay of the captured whole-model decode forward (CUDA events, median);
* ``eager``: the same forward without CUDA graphs (launch-bound, for comparison);
* ``step``: one full ``ModelRunner.execute`` (host metadata, one copy, replay, greedy sampling
  and its host sync), median of host wall times;
* ``attn``: the Triton decode attention of one layer alone, with its achieved bandwidth.

Floor = (bytes of every weight a decode step reads + KV bytes) / device-to-device copy
bandwidth measured in the same run (bytes read + written). Prints a table, then one JSON line.

    python benchmarks/bench_decode_gpu.py [--batches 1 32 128 256] [--context 1024] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

GIB = 1 << 30


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-eager", action="store_true", help="skip the eager (no graph) timing")
    p.add_argument("--unfused", action="store_true", help="also time graphs without the fused pointwise kernels")
    p.add_argument("--profile", action="store_true", help="print the top kernels of one replay at the largest batch")
    return p.parse_args()


def copy_bandwidth(torch, do_bench) -> float:
    """Bytes/s of a 4 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (4 * GIB,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=500, return_mode="median")
    del src, dst
    return 2 * 4 * GIB / (ms * 1e-3)


def build_engine(args):
    from kunserve.bench._model_configs import write_model_config
    from kunserve.config import EngineConfig
    from kunserve.runtime.engine import LLMEngine

    max_batch = max(args.batches)
    blocks_per_seq = -(-(args.context + 1) // args.block_size)
    config = EngineConfig(
        model=str(write_model_config("llama3-8b")), load_format="dummy", dtype="bfloat16",
        block_size=args.block_size, num_kv_blocks=max_batch * blocks_per_seq + 8,
        max_model_len=args.context + 16, max_num_seqs=max_batch)
    return LLMEngine(config)


def decode_plan(engine, batch: int, context: int, tag: str):
    """B running requests whose next step decodes position ``context - 1``."""
    from kunserve.runtime.request import Request
    from kunserve.runtime.scheduler import ScheduledChunk, SchedulerOutput
    from kunserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    chunks = []
    for i in range(batch):
        rid = f"{tag}-{i}"
        request = Request(rid, [(7 * i + j) % 1000 for j in range(context)], params, context + 16)
        request.num_computed_tokens = context - 1
        engine.block_manager.allocate(rid, context)
        chunks.append(ScheduledChunk(request, 1))
    return SchedulerOutput(tuple(chunks))


def weight_bytes_read(engine) -> int:
    """Every parameter except the embedding table (a decode step gathers only B of its rows)."""
    return sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)


def kv_bytes(engine, batch: int, context: int) -> int:
    cfg = engine.model_config
    return batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * engine.dtype.itemsize


def time_attention(torch, do_bench, engine, step) -> float:
    """Median ms of the Triton decode attention of layer 0 alone for this step."""
    from kunserve.runtime import gpu_inputs, triton_attention

    cfg, cuda = engine.model_config, engine.runner.cuda
    splits = triton_attention.decode_splits(step.num_seqs, cfg.num_kv_heads, int(step.context_lens.max()), cuda.num_sms)
    dev = gpu_inputs.upload(step, engine.device, engine.kv_cache.block_size, cuda.query_tile, splits)
    q = torch.randn(step.num_seqs, cfg.num_heads, cfg.head_dim, device="cuda", dtype=engine.dtype)
    k_cache, v_cache = engine.kv_cache.layer(0)
    scale = cfg.head_dim**-0.5
    return do_bench(lambda: triton_attention.paged_attention(q, k_cache, v_cache, dev.meta, scale),
                    warmup=20, rep=200, return_mode="median")


def measure_batch(torch, do_bench, engine, args, batch: int, bw: float) -> dict:
    from kunserve.runtime import gpu_inputs

    runner, cuda = engine.runner, engine.runner.cuda
    plan = decode_plan(engine, batch, args.context, f"b{batch}")
    step = gpu_inputs.HostStep.build(plan.chunks, engine.block_manager)
    cuda.graphs.run(step)  # stage this batch's inputs in the graph's static buffers
    graph, _ = cuda.graphs.graphs[cuda.graphs.bucket_for(batch)]
    graph_ms = do_bench(graph.replay, warmup=20, rep=300, return_mode="median")
    eager_ms = None if args.no_eager else do_bench(lambda: cuda._eager_logits(step), warmup=3, rep=100,
                                                    return_mode="median")
    walls = []
    for _ in range(30):
        start = time.perf_counter()
        runner.execute(plan)
        walls.append(time.perf_counter() - start)
    attn_ms = time_attention(torch, do_bench, engine, step)
    floor_bytes = weight_bytes_read(engine) + kv_bytes(engine, batch, args.context)
    floor_ms = floor_bytes / bw * 1e3
    layer_kv = kv_bytes(engine, batch, args.context) / engine.model_config.num_layers
    for chunk in plan.chunks:
        engine.block_manager.free(chunk.request.request_id)
    return {"batch": batch, "context": args.context, "graph_ms": graph_ms, "floor_ms": floor_ms,
            "graph_over_floor": graph_ms / floor_ms, "eager_ms": eager_ms,
            "step_ms": 1e3 * statistics.median(walls[5:]), "tokens_per_s": batch / (graph_ms * 1e-3),
            "attn_layer_ms": attn_ms, "attn_tbps": layer_kv / (attn_ms * 1e-3) / 1e12}


def profile_replay(torch, engine, batch: int) -> None:
    cuda = engine.runner.cuda
    graph, _ = cuda.graphs.graphs[cuda.graphs.bucket_for(batch)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def print_table(rows: list[dict], bw: float, tag: str = "") -> None:
    print(f"decode step, Llama-3-8B shape, bf16{tag}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'batch':>5} {'ctx':>5} {'graph ms':>9} {'floor ms':>9} {'ratio':>6} {'eager ms':>9} "
          f"{'step ms':>8} {'tok/s':>8} {'attn ms':>8} {'attn TB/s':>9}")
    for r in rows:
        eager = f"{r['eager_ms']:9.2f}" if r["eager_ms"] is not None else f"{'-':>9}"
        print(f"{r['batch']:>5} {r['context']:>5} {r['graph_ms']:9.2f} {r['floor_ms']:9.2f} "
              f"{r['graph_over_floor']:6.2f} {eager} {r['step_ms']:8.2f} {r['tokens_per_s']:8.0f} "
              f"{r['attn_layer_ms']:8.3f} {r['attn_tbps']:9.2f}")


def main() -> None:
    args = parse_args()
    import torch
    from triton.testing import do_bench

    bw = copy_bandwidth(torch, do_bench)
    engine = build_engine(args)
    cfg = engine.model_config
    cfg_bytes = engine.block_manager.num_blocks * engine.memory.block_bytes
    engine.kv_cache.storage.normal_()  # never time on zeros
    rows = [measure_batch(torch, do_bench, engine, args, b, bw) for b in args.batches]
    print_table(rows, bw)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tbps": bw / 1e12,
              "weights_read_gib": weight_bytes_read(engine) / GIB, "kv_cache_gib": cfg_bytes / GIB,
              "layers": cfg.num_layers, "rows": rows}
    if args.profile:
        profile_replay(torch, engine, max(args.batches))
    if args.unfused:
        import kunserve.models.llama as llama

        llama._FUSED_OPS = False
        engine.runner.cuda._build_graphs()
        args.no_eager = True
        unfused = [measure_batch(torch, do_bench, engine, args, b, bw) for b in args.batches]
        print_table(unfused, bw, " (unfused pointwise ops)")
        result["unfused_rows"] = unfused
    print(json.dumps(result))


if __name__ == "__main__":
    main()
