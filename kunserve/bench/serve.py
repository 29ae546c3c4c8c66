"""Load a running server over HTTP with streaming completions and report serving metrics.

    python -m kunserve.bench serve --base-url http://127.0.0.1:8000 --model NAME \\
        --num-prompts 200 --input-len 64 --output-len 32 --request-rate 20 --burstiness 1

Arrivals: a replayed trace (``--trace AzureLLMInferenceTrace_conv.csv`` with windows and
upscaling, see ``kunserve.bench.workload``), or synthetic: gamma inter-arrival times at
``--request-rate`` (``inf``: all at once; ``--burstiness`` < 1 is burstier) or on/off bursts.
Prompts are random token ids, so any model and tokenizer work. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from kunserve.bench._metrics import RequestRecord, serving_metrics
from kunserve.bench.traces import WorkItem, to_work_items
from kunserve.bench.workload import add_workload_args, build_workload


async def _one(client, model: str, item: WorkItem, start: float) -> RequestRecord:
    import httpx

    await asyncio.sleep(max(0.0, start + item.delay_s - time.perf_counter()))
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent, times, tokens = time.perf_counter(), [], item.max_tokens
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return RequestRecord(sent, (), 0, len(item.prompt), False, (await response.aread()).decode())
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return RequestRecord(sent, tuple(times), 0, len(item.prompt), False, repr(e))
    return RequestRecord(sent, tuple(times), tokens, len(item.prompt), bool(times))


async def run_load(base_url: str, model: str, items: list[WorkItem], timeout_s: float = 600) -> tuple[list[RequestRecord], float]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(_one(client, model, item, start) for item in items))
        return list(records), time.perf_counter() - start


def format_table(metrics: dict) -> str:
    lines = [f"{'completed':<28}{metrics['completed']}", f"{'failed':<28}{metrics['failed']}",
             f"{'duration (s)':<28}{metrics['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{metrics['request_throughput']:.2f}",
             f"{'output throughput (tok/s)':<28}{metrics['output_throughput']:.1f}"]
    for name in ("ttft_s", "tpot_s", "itl_s", "e2el_s"):
        s = metrics[name]
        lines.append(f"{name[:-2].upper() + ' (ms)':<28}mean {s['mean'] * 1e3:8.1f}  median {s['median'] * 1e3:8.1f}"
                     f"  p90 {s['p90'] * 1e3:8.1f}  p99 {s['p99'] * 1e3:8.1f}  p99.9 {s['p99.9'] * 1e3:8.1f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunserve.bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn below this")
    p.add_argument("--max-model-len", type=int, default=4096, help="the server's context: trace lengths are clipped to it")
    p.add_argument("--kv-capacity-tokens", type=float, default=None, help="the cluster's KV capacity, for --target-demand")
    add_workload_args(p, synthetic="gamma", num_prompts=100, input_len=64, output_len=32, request_rate=float("inf"))
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the load, print the table and the JSON line, return the metrics."""
    items = to_work_items(build_workload(args, args.kv_capacity_tokens), args.vocab_size, args.seed)
    records, duration = asyncio.run(run_load(args.base_url, args.model, items))
    metrics = serving_metrics(records, duration)
    print(format_table(metrics))
    print(json.dumps({"bench": "serve", **vars(args), **metrics}))
    return metrics


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
