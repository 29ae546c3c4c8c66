"""Offline throughput with vLLM's benchmark arguments: ``python -m kunserve.bench throughput``.

``--num-prompts`` random token-id prompts of ``--input-len`` tokens each generate exactly
``--output-len`` tokens (greedy, ignore_eos), all submitted at once through ``LLM.generate``.
Engine construction (weights, KV profiling, CUDA-graph capture) and one short warm-up request
are outside the timed region. Prints a table, then one JSON line.

    python -m kunserve.bench throughput --model-config llama3-8b --load-format dummy \\
        --dtype bfloat16 --num-prompts 256 --input-len 512 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from kunserve.bench._model_configs import MODEL_CONFIGS, write_model_config

GIB = 1 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kunserve.bench throughput", description=__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="model directory (only config.json is needed with --load-format dummy)")
    model.add_argument("--model-config", choices=sorted(MODEL_CONFIGS),
                       help="a built-in model shape (implies --load-format dummy)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--memory", default="auto", choices=["auto", "vmm", "torch"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="default: input + output length")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def engine_args(args: argparse.Namespace) -> tuple[str, dict]:
    model = args.model or str(write_model_config(args.model_config))
    load_format = "dummy" if args.model_config else args.load_format
    kwargs = dict(
        load_format=load_format, dtype=args.dtype, device=args.device, memory=args.memory,
        max_num_seqs=args.max_num_seqs, block_size=args.block_size, seed=args.seed,
        max_model_len=args.max_model_len or args.input_len + args.output_len,
        enforce_eager=args.enforce_eager, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return model, kwargs


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def run(args: argparse.Namespace) -> dict:
    from kunserve import LLM, SamplingParams

    model, kwargs = engine_args(args)
    build_start = time.perf_counter()
    llm = LLM(model, **kwargs)
    engine = llm.engine
    build_s = time.perf_counter() - build_start
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(random_prompts(1, args.input_len, vocab, args.seed + 1), SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall_start, start = time.time(), time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    first_token_done = max(o.metrics.first_token_time for o in outputs) - wall_start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    result = {
        "model": args.model_config or args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(engine.dtype).removeprefix("torch."), "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "enforce_eager": args.enforce_eager,
        "max_num_seqs": engine.config.max_num_seqs, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "elapsed_s": elapsed, "requests_per_s": args.num_prompts / elapsed,
        "output_tokens_per_s": out_tokens / elapsed, "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "output_tokens": out_tokens, "until_all_first_tokens_s": first_token_done,
        "num_preemptions": engine.scheduler.num_preemptions, "engine_build_s": build_s,
        "kv_cache_blocks": engine.block_manager.num_blocks,
        "kv_cache_gib": engine.block_manager.num_blocks * engine.memory.block_bytes / GIB,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(
            peak_memory_gib=(total - free) / GIB,  # whole device: weights + KV + torch pools + context
            torch_peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            weights_gib=sum(p.numel() * p.element_size() for p in engine.model.parameters()) / GIB,
        )
    return result


def print_table(result: dict) -> None:
    rows = [("elapsed", f"{result['elapsed_s']:.3f} s"),
            ("requests/s", f"{result['requests_per_s']:.2f}"),
            ("output tok/s", f"{result['output_tokens_per_s']:,.0f}"),
            ("total tok/s", f"{result['total_tokens_per_s']:,.0f}"),
            ("until every first token", f"{result['until_all_first_tokens_s']:.3f} s"),
            ("KV cache", f"{result['kv_cache_blocks']} blocks, {result['kv_cache_gib']:.2f} GiB"),
            ("preemptions", str(result["num_preemptions"]))]
    if "peak_memory_gib" in result:
        rows += [("peak memory (device)", f"{result['peak_memory_gib']:.2f} GiB"),
                 ("torch peak allocated", f"{result['torch_peak_allocated_gib']:.2f} GiB"),
                 ("weights", f"{result['weights_gib']:.2f} GiB")]
    print(f"throughput: {result['model']} on {result['device']} ({result['dtype']}), {result['num_prompts']} "
          f"prompts x {result['input_len']} in / {result['output_len']} out, eager={result['enforce_eager']}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    line = json.dumps(result)
    print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(line + "\n")
    return 0
