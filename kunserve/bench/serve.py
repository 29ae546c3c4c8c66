"""Load a running server over HTTP with streaming completions and report serving metrics.

    python -m kunserve.bench serve --base-url http://127.0.0.1:8000 --model NAME \\
        --num-prompts 200 --input-len 64 --output-len 32 --request-rate 20 --burstiness 1

Arrivals: Poisson (``--burstiness 1``) or gamma inter-arrival times (burstiness < 1 is
burstier), at ``--request-rate`` requests/s (``inf``: all at once). Prompts are random token
ids, so any model and tokenizer work. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import attrs

from kunserve.bench._metrics import RequestRecord, serving_metrics


@attrs.frozen
class WorkItem:
    delay_s: float  # send time relative to the start
    prompt: list[int]
    max_tokens: int


def synthetic_workload(num: int, input_len: int, output_len: int, rate: float, burstiness: float,
                       vocab: int, seed: int) -> list[WorkItem]:
    rng = random.Random(seed)
    items, t = [], 0.0
    for _ in range(num):
        items.append(WorkItem(t, [rng.randrange(10, vocab) for _ in range(input_len)], output_len))
        if rate != float("inf"):
            # gamma(shape=burstiness, scale=1/(rate*burstiness)) has mean 1/rate (vLLM's choice)
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return items


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
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the load, print the table and the JSON line, return the metrics."""
    items = synthetic_workload(args.num_prompts, args.input_len, args.output_len, args.request_rate,
                               args.burstiness, args.vocab_size, args.seed)
    records, duration = asyncio.run(run_load(args.base_url, args.model, items))
    metrics = serving_metrics(records, duration)
    print(format_table(metrics))
    print(json.dumps({"bench": "serve", **vars(args), **metrics}))
    return metrics


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
