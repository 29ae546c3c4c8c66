"""Run one workload against several serving policies and compare them.

    python -m kunserve.bench compare --policies vllm kunserve --ranks 2 \\
        [--model DIR] [--trace AzureLLMInferenceTrace_conv.csv | --synthetic onoff] \\
        [--out DIR]

Each policy gets a fresh ``torchrun -m kunserve.serve`` cluster on loopback (built-in tiny model
unless ``--model``). While the load runs, ``/metrics`` is polled every ``--poll-s`` seconds for
the timeline (KV demand vs capacity per instance, drop / restore counters). Writes
``compare.json``, ``table.txt`` and PNG figures (timeline, latency CDFs, SLO scales) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import threading
import time
from pathlib import Path

from kunserve.bench import traces
from kunserve.bench._metrics import RequestRecord, meets_slo, serving_metrics
from kunserve.bench.serve import _one
from kunserve.bench.traces import WorkItem
from kunserve.bench.workload import add_workload_args, build_workload

SLO_SCALES = tuple(range(1, 11))
TINY_DIR = Path.home() / ".cache/kunserve/tiny-llama"


# --- /metrics timeline ------------------------------------------------------------------------------

def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """``{metric (without the kunserve_ prefix): {label string or "": value}}``."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        metric, _, labels = name.partition("{")
        out.setdefault(metric.removeprefix("kunserve_"), {})[labels.rstrip("}")] = float(value)
    return out


def _instance(labels: str) -> str:
    return labels.partition('instance="')[2].partition('"')[0]


def sample_from_metrics(t: float, metrics: dict[str, dict[str, float]]) -> dict:
    """One timeline point: per-instance capacity / demand (blocks) and the cluster counters."""
    per_instance = {}
    for key in ("kv_cache_total_blocks", "memory_demand_blocks", "preemptions_total", "requests_waiting",
                "swapped_out_bytes_total"):
        for labels, value in metrics.get(key, {}).items():
            per_instance.setdefault(_instance(labels), {})[key] = value
    scalar = {k: sum(metrics.get(k, {}).values())
              for k in ("drops_total", "restores_total", "migrations_completed_total")}
    return {"t": t, "instances": per_instance, **scalar}


class MetricsPoller:
    """Background thread that samples ``/metrics``; times are relative to ``t0`` (perf_counter)."""

    def __init__(self, base_url: str, period_s: float = 0.1):
        self.base_url, self.period_s = base_url, period_s
        self.samples: list[dict] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _loop(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while not self._stop.is_set():
                try:
                    text = client.get("/metrics").text
                    self.samples.append(sample_from_metrics(time.perf_counter() - self.t0, parse_prometheus(text)))
                except httpx.HTTPError:
                    pass  # a slow step can delay one poll; the next one fills the gap
                self._stop.wait(self.period_s)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


def counter_events(samples: list[dict], key: str) -> list[float]:
    """Times at which a counter went up (one entry per increment seen)."""
    events, last = [], 0.0
    for s in samples:
        value = s.get(key, 0.0)  # older samples (and other policies) may lack a counter
        if value > last:
            events.extend([s["t"]] * int(value - last))
        last = max(last, value)
    return events


def total_preemptions(samples: list[dict], key: str = "preemptions_total") -> int:
    """Instances vanish when merged, so sum each instance's highest count ever seen."""
    best: dict[str, float] = {}
    for s in samples:
        for iid, v in s["instances"].items():
            best[iid] = max(best.get(iid, 0.0), v.get(key, 0.0))
    return int(sum(best.values()))


# --- SLO scales ------------------------------------------------------------------------------------

def slo_sweep(records: dict[str, list[RequestRecord]], durations: dict[str, float],
              scales=SLO_SCALES) -> dict:
    """Goodput and violation rate per policy at SLO scale N = N x the best policy's P50 TTFT and
    P50 TPOT (the paper's convention). Failed requests count as violations."""
    base_ttft = min(serving_metrics(r, durations[p])["ttft_s"]["median"] for p, r in records.items())
    base_tpot = min(serving_metrics(r, durations[p])["tpot_s"]["median"] for p, r in records.items())
    out = {"base_ttft_s": base_ttft, "base_tpot_s": base_tpot, "scales": list(scales), "policies": {}}
    for policy, recs in records.items():
        rows = []
        for n in scales:
            slo = {"ttft": n * base_ttft}
            if not math.isnan(base_tpot):
                slo["tpot"] = n * base_tpot
            good = sum(1 for r in recs if r.ok and r.token_times and meets_slo(r, slo))
            rows.append({"scale": n, "goodput": good / durations[policy],
                         "violation_rate": 1 - good / len(recs) if recs else math.nan})
        out["policies"][policy] = rows
    return out


# --- running ---------------------------------------------------------------------------------------

async def _load_with_progress(base_url: str, model: str, items: list[WorkItem], start_cb) -> tuple[list, float]:
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        start_cb(start)
        tasks = [asyncio.ensure_future(_one(client, model, item, start)) for item in items]
        with tqdm(total=len(tasks), desc="requests", unit="req", leave=False) as bar:
            for fut in asyncio.as_completed(tasks):
                await fut
                bar.update(1)
        return [t.result() for t in tasks], time.perf_counter() - start


def pipeline_kv_blocks(model_dir: Path, num_kv_blocks: int, block_size: int, stages: int = 2) -> int:
    """KV blocks per rank of a static ``stages``-stage pipeline given the same memory per rank as
    a whole-model instance with ``num_kv_blocks``: a stage holds a slice of the weights, so the
    rest of the rank's memory is KV, in blocks of the stage's layers (the paper's vLLM-PP
    baseline: half the weights per GPU, more KV). The smallest stage decides (one pool size)."""
    import torch

    from kunserve.models import ModelConfig, build_model
    from kunserve.policy.drop import balanced_cuts
    from kunserve.runtime.kv_cache import kv_block_bytes

    cfg = ModelConfig.from_dir(model_dir)
    itemsize = cfg.dtype.itemsize

    def weight_bytes(layer_range=None) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(cfg, layer_range).parameters()) * itemsize

    def block_bytes(num_layers: int) -> int:
        return kv_block_bytes(num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)

    budget = weight_bytes() + num_kv_blocks * block_bytes(cfg.num_layers)
    return min((budget - weight_bytes((a, b))) // block_bytes(b - a) for a, b in balanced_cuts(cfg.num_layers, stages))


def serve_args(args, policy: str, model_dir: Path | None = None) -> list[str]:
    out = ["--policy", policy, "--block-size", str(args.block_size), "--max-model-len", str(args.max_model_len),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.num_kv_blocks and policy == "vllm-pp" and model_dir is not None:
        out += ["--num-kv-blocks", str(pipeline_kv_blocks(model_dir, args.num_kv_blocks, args.block_size))]
    elif args.num_kv_blocks:
        out += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if policy == "kunserve":
        out += ["--restore-hold-s", str(args.restore_hold_s)]
    if policy == "swap":
        out += ["--swap-space-bytes", str(args.swap_space_bytes),
                "--swap-bytes-per-step", str(args.swap_bytes_per_step)]
    return out + list(args.serve_arg)


def run_policy(args, model_dir: Path, policy: str, workload_for) -> dict:
    """Start a cluster, run the workload (built from its KV capacity), stop the cluster."""
    import httpx

    from kunserve.bench._launch import LocalCluster

    cluster = LocalCluster(model_dir, args.ranks, serve_args(args, policy, model_dir), served_model_name="model",
                           log_level="WARNING")
    try:
        with cluster.pinned_to_cores() if args.pin_cores else contextlib.nullcontext():
            poller = MetricsPoller(cluster.base_url, args.poll_s)
            first = parse_prometheus(httpx.get(f"{cluster.base_url}/metrics").text)
            capacity_tokens = sum(first.get("kv_cache_total_blocks", {}).values()) * args.block_size
            items = workload_for(capacity_tokens)
            records, duration = asyncio.run(_load_with_progress(cluster.base_url, "model", items, poller.start))
            time.sleep(min(args.tail_s, 30))  # watch the restore that follows the load
            samples = poller.stop()
    finally:
        cluster.stop()
    return {"records": records, "duration_s": duration, "samples": samples, "t0": poller.t0,
            "capacity_tokens_at_start": capacity_tokens}


def summarize_policy(result: dict) -> dict:
    metrics = serving_metrics(result["records"], result["duration_s"])
    samples = result["samples"]
    return {**metrics, "drops": len(counter_events(samples, "drops_total")),
            "restores": len(counter_events(samples, "restores_total")),
            "preemptions": total_preemptions(samples),
            "swapped_out_bytes": total_preemptions(samples, "swapped_out_bytes_total"),
            "migrations": len(counter_events(samples, "migrations_completed_total"))}


def format_table(summary: dict[str, dict], sweep: dict) -> str:
    ms = lambda v: f"{v * 1e3:8.1f}"  # noqa: E731
    head = (f"{'policy':>9} {'TTFT mean':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'TPOT p50':>8} {'p99':>8} "
            f"{'E2EL p50':>8} {'p99':>8} {'req/s':>6} {'drops':>5} {'restores':>8} {'preempt':>7} "
            f"{'swap MB':>7} {'migr':>4}")
    lines = ["latencies in ms", head]
    for p, m in summary.items():
        t, o, e = m["ttft_s"], m["tpot_s"], m["e2el_s"]
        lines.append(f"{p:>9} {t['mean'] * 1e3:9.1f} {ms(t['median'])} {ms(t['p90'])} {ms(t['p99'])} "
                     f"{ms(o['median'])} {ms(o['p99'])} {ms(e['median'])} {ms(e['p99'])} "
                     f"{m['request_throughput']:6.2f} {m['drops']:5d} {m['restores']:8d} {m['preemptions']:7d} "
                     f"{m.get('swapped_out_bytes', 0) / 2**20:7.1f} {m.get('migrations', 0):4d}")
    lines.append(f"\nSLO scale N = N x best P50 TTFT ({sweep['base_ttft_s'] * 1e3:.1f} ms) and TPOT "
                 f"({sweep['base_tpot_s'] * 1e3:.1f} ms): violation rate / goodput (req/s)")
    lines.append(f"{'scale':>5} " + " ".join(f"{p:>18}" for p in sweep["policies"]))
    for i, n in enumerate(sweep["scales"]):
        cells = [f"{rows[i]['violation_rate'] * 100:8.1f}% / {rows[i]['goodput']:6.2f}"
                 for rows in sweep["policies"].values()]
        lines.append(f"{n:>5} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def p99_ttft_ratio(summary: dict[str, dict], baseline: str = "vllm", ours: str = "kunserve") -> float | None:
    if baseline in summary and ours in summary:
        return summary[baseline]["ttft_s"]["p99"] / summary[ours]["ttft_s"]["p99"]
    return None


# --- CLI -------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunserve.bench compare", description=__doc__.splitlines()[0])
    p.add_argument("--policies", nargs="+", default=["vllm", "kunserve"],
                   choices=["vllm", "vllm-pp", "swap", "llumnix", "kunserve"],
                   help="kunserve.serve --policy values to compare (vllm-pp: 2-stage pipelines, needs even --ranks)")
    p.add_argument("--swap-space-bytes", type=int, default=4 << 30, help="swap: host swap space per instance")
    p.add_argument("--swap-bytes-per-step", type=int, default=512 << 20, help="swap: swap-in bytes per step")
    p.add_argument("--model", default=None, help="model dir (default: the built-in tiny model)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--num-kv-blocks", type=int, default=16, help="per instance; 0 = size from memory")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--restore-hold-s", type=float, default=1.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra kunserve.serve argument (repeat)")
    p.add_argument("--poll-s", type=float, default=0.1)
    p.add_argument("--tail-s", type=float, default=3.0, help="keep polling this long after the last request")
    p.add_argument("--window-s", type=float, default=0.5, help="timeline window for rates and mean TTFT")
    p.add_argument("--out", default="kunserve-compare")
    p.add_argument("--pin-cores", action="store_true",
                   help="pin rank r to core r and the load client to rank 0's core (LocalCluster.pinned_to_cores; "
                        "on the 2-core VM it slowed these runs and did not make them repeatable: BENCHMARKS.md)")
    add_workload_args(p)
    return p.parse_args(argv)


def model_dir_and_vocab(model: str | None) -> tuple[Path, int]:
    model_dir = Path(model) if model else TINY_DIR
    if model is None and not (model_dir / "config.json").exists():
        from kunserve.models.tiny import make_tiny_checkpoint

        make_tiny_checkpoint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    return model_dir, int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 256))


def run(args) -> dict:
    from kunserve.bench import plots

    model_dir, vocab = model_dir_and_vocab(args.model)
    cache: dict = {}

    def workload_for(capacity_tokens: float) -> list[WorkItem]:
        # built once, from the first cluster's capacity, so every policy gets the same requests
        if "items" not in cache:
            cache["items"] = traces.to_work_items(build_workload(args, capacity_tokens), vocab, args.seed)
        return cache["items"]

    results = {}
    for policy in args.policies:
        print(f"== policy {policy}: {args.ranks} ranks, model {model_dir}")
        results[policy] = run_policy(args, model_dir, policy, workload_for)
    summary = {p: summarize_policy(r) for p, r in results.items()}
    sweep = slo_sweep({p: r["records"] for p, r in results.items()}, {p: r["duration_s"] for p, r in results.items()})
    table = format_table(summary, sweep)
    ratio = p99_ttft_ratio(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.write_all(out, results, sweep, args.window_s)
    report = {"args": vars(args), "summary": summary, "slo": sweep, "p99_ttft_ratio_vllm_over_kunserve": ratio,
              "timelines": {p: r["samples"] for p, r in results.items()},
              "requests": {p: [{"send": r.send_time - res["t0"], "ttft": r.ttft if r.token_times else None,
                                "tpot": r.tpot if r.token_times else None, "ok": r.ok} for r in res["records"]]
                           for p, res in results.items()},
              "figures": [str(f) for f in figures]}
    (out / "compare.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "table.txt").write_text(table + "\n")
    print(table)
    if ratio is not None:
        print(f"P99 TTFT vllm / kunserve: {ratio:.2f}x")
    print(f"wrote {out / 'compare.json'}, {out / 'table.txt'}, " + ", ".join(str(f) for f in figures))
    return {"summary": summary, "slo": sweep, "p99_ttft_ratio": ratio, "figures": figures, "out": out}


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
