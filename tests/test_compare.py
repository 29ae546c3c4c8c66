"""SLO-scale table, /metrics timeline parsing and figures of ``kunserve.bench compare``.

Unit tests use synthetic records and timelines (no cluster); the last test runs the real demo
on 2 CPU ranks end to end.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from kunserve.bench.workload import build_workload
from kunserve.bench import compare, plots
from kunserve.bench._metrics import RequestRecord


def _rec(ttft: float, tpot: float, ok: bool = True) -> RequestRecord:
    # sent at 0, 3 tokens: TTFT = first token time, TPOT = (e2el - ttft) / 2 — all binary-exact
    return RequestRecord(0.0, (ttft, ttft + tpot, ttft + 2 * tpot), 3, 8, ok)


RECORDS = {
    "a": [_rec(t, 0.0625) for t in (0.125, 0.25, 0.375, 0.5)],
    "b": [_rec(t, 0.125) for t in (0.25, 0.5, 0.75, 1.25)] + [RequestRecord(0.0, (), 0, 8, False, "boom")],
}
DURATIONS = {"a": 4.0, "b": 8.0}


def test_slo_sweep_exact():
    sweep = compare.slo_sweep(RECORDS, DURATIONS, scales=(1, 2, 3, 4))
    # best P50 TTFT: a's (0.25 + 0.375) / 2; best P50 TPOT: a's 0.0625
    assert sweep["base_ttft_s"] == 0.3125 and sweep["base_tpot_s"] == 0.0625
    a, b = sweep["policies"]["a"], sweep["policies"]["b"]
    assert [r["violation_rate"] for r in a] == [0.5, 0.0, 0.0, 0.0]
    assert [r["goodput"] for r in a] == [0.5, 1.0, 1.0, 1.0]
    # b: TPOT 0.125 fails scale 1; TTFT limits 0.625, 0.9375, 1.25 admit 2, 3, 4; the failed
    # request always counts as a violation
    assert [r["violation_rate"] for r in b] == [1.0, 0.6, 0.4, pytest.approx(0.2)]
    assert [r["goodput"] for r in b] == [0.0, 0.25, 0.375, 0.5]


def test_table_lists_every_policy_and_scale():
    summary = {p: {**compare.serving_metrics(r, DURATIONS[p]), "drops": 1, "restores": 0, "preemptions": 3}
               for p, r in RECORDS.items()}
    table = compare.format_table(summary, compare.slo_sweep(RECORDS, DURATIONS))
    assert "312.5 ms" in table and "62.5 ms" in table
    row_a = next(line for line in table.splitlines() if line.split()[:1] == ["a"])
    assert row_a.split()[1:4] == ["312.5", "312.5", "462.5"]  # TTFT mean, p50, p90
    assert len([line for line in table.splitlines() if line.strip()[:2].strip().isdigit()]) == 10
    summary["vllm"], summary["kunserve"] = summary["b"], summary["a"]
    assert compare.p99_ttft_ratio(summary) == pytest.approx(1.235 / 0.49625)


METRICS_TEXT = """# HELP kunserve_kv_cache_total_blocks KV-cache blocks in the pool.
kunserve_kv_cache_total_blocks{instance="0"} 16
kunserve_kv_cache_total_blocks{instance="1"} 16
kunserve_memory_demand_blocks{instance="0"} 20
kunserve_memory_demand_blocks{instance="1"} 4
kunserve_preemptions_total{instance="0"} 2
kunserve_drops_total 1
kunserve_restores_total 0
"""


def test_metrics_sample_and_counters():
    s = compare.sample_from_metrics(1.5, compare.parse_prometheus(METRICS_TEXT))
    assert s == {"t": 1.5, "drops_total": 1.0, "restores_total": 0.0, "migrations_completed_total": 0.0, "instances": {
        "0": {"kv_cache_total_blocks": 16.0, "memory_demand_blocks": 20.0, "preemptions_total": 2.0},
        "1": {"kv_cache_total_blocks": 16.0, "memory_demand_blocks": 4.0}}}
    samples = _timeline()
    assert compare.counter_events(samples, "drops_total") == [1.0]
    assert compare.counter_events(samples, "restores_total") == [3.0]
    # instance 1 vanished into the merged group after 2 preemptions: still counted
    assert compare.total_preemptions(samples) == 2 + 5


def _timeline() -> list[dict]:
    def inst(cap, dem, pre):
        return {"kv_cache_total_blocks": cap, "memory_demand_blocks": dem, "preemptions_total": pre}

    return [
        {"t": 0.0, "drops_total": 0, "restores_total": 0, "instances": {"0": inst(16, 4, 0), "1": inst(16, 4, 0)}},
        {"t": 1.0, "drops_total": 1, "restores_total": 0, "instances": {"0": inst(200, 90, 5), "1": inst(16, 20, 2)}},
        {"t": 2.0, "drops_total": 1, "restores_total": 0, "instances": {"0": inst(200, 150, 5)}},
        {"t": 3.0, "drops_total": 1, "restores_total": 1, "instances": {"0": inst(16, 2, 0), "1": inst(16, 0, 0)}},
    ]


def test_series_helpers_exact():
    assert plots.rate_series([0.1, 0.2, 1.4, 3.9], 4.0, 1.0) == ([0.0, 1.0, 2.0, 3.0], [2.0, 1.0, 0.0, 1.0])
    xs, means = plots.mean_ttft_series([0.1, 0.2, 1.4], [0.5, 0.25, 1.0], 3.0, 1.0)
    assert means[:2] == [0.375, 1.0] and means[2] != means[2]  # NaN: nothing sent in [2, 3)
    assert plots.kv_series(_timeline()) == ([0.0, 1.0, 2.0, 3.0], [8, 110, 150, 2], [32, 216, 200, 32])


def test_plots_write_nonempty_pngs(tmp_path):
    t0 = 100.0
    results = {p: {"records": [RequestRecord(t0 + r.send_time + i * 0.3, tuple(t0 + i * 0.3 + x for x in r.token_times),
                                             r.output_tokens, 8, r.ok) for i, r in enumerate(recs)],
                   "samples": _timeline(), "t0": t0, "duration_s": 4.0}
               for p, recs in {"vllm": RECORDS["b"], "kunserve": RECORDS["a"]}.items()}
    figures = plots.write_all(tmp_path, results, compare.slo_sweep(RECORDS, DURATIONS), window_s=0.5)
    assert [f.name for f in figures] == ["timeline.png", "latency_cdf.png", "slo.png"]
    for f in figures:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_synthetic_workload_is_the_same_for_every_policy():
    args = compare.parse_args(["--num-prompts", "20"])
    a, b = build_workload(args, 128), build_workload(args, 128)
    assert a == b and len(a) == 20 and max(p + o for p, o in zip(a.prompt_lens, a.output_lens)) <= 64


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None, reason="needs the [serve] extra")
def test_demo_end_to_end(tmp_path):
    """The README's main job, smaller: a real 2-rank burst, both policies, figures written."""
    proc = subprocess.run([sys.executable, "-m", "kunserve.demo", "--num-prompts", "32", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "P99 TTFT vllm / kunserve" in proc.stdout
    assert "kunserve dropped weights" in proc.stdout
    for name in ("timeline.png", "latency_cdf.png", "slo.png", "compare.json", "table.txt"):
        assert (tmp_path / name).stat().st_size > 0


def test_vllm_pp_gets_the_kv_its_halved_weights_leave(llama_dir):
    """Same memory per rank: whole-model weights + 16 full blocks == stage weights + N stage blocks."""
    import torch

    from kunserve.models import ModelConfig, build_model
    from kunserve.runtime.kv_cache import kv_block_bytes

    cfg = ModelConfig.from_dir(llama_dir)
    size = lambda r=None: sum(p.numel() for p in build_model(cfg, r).parameters()) * cfg.dtype.itemsize  # noqa: E731
    with torch.device("meta"):
        full, first, second = size(), size((0, 2)), size((2, 4))
    full_block = kv_block_bytes(4, 4, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)
    budget = full + 16 * full_block
    blocks = compare.pipeline_kv_blocks(llama_dir, 16, 4)
    stage_block = full_block // 2
    assert max(first, second) + blocks * stage_block <= budget < max(first, second) + (blocks + 1) * stage_block
    assert blocks > 2 * 16  # the freed half of the weights is KV now
    args = compare.parse_args(["--num-kv-blocks", "16"])
    pool = lambda policy: compare.serve_args(args, policy, llama_dir)[compare.serve_args(args, policy, llama_dir).index("--num-kv-blocks") + 1]  # noqa: E731
    assert pool("vllm") == pool("kunserve") == "16" and pool("vllm-pp") == str(blocks)
