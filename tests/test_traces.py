"""Trace loading, windows, upscaling and synthetic arrivals (kunserve.bench.traces)."""

from __future__ import annotations

import statistics

import pytest

from kunserve.bench import traces
from kunserve.bench.traces import WorkItem

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.0000000,100,10
2023-11-16 18:15:46.5000001,200,20
2023-11-16 18:15:47.2500000,300,30
2023-11-16 18:15:50.0000000,400,40
"""


@pytest.fixture
def trace_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(CSV)
    return path


def test_load_parses_seven_digit_timestamps(trace_csv):
    t = traces.load_trace(trace_csv)
    assert t.arrivals == (0.0, 0.5, 1.25, 4.0)  # the 7th digit (100 ns) is dropped
    assert t.prompt_lens == (100, 200, 300, 400)
    assert t.output_lens == (10, 20, 30, 40)
    assert t.duration_s == 4.0


@pytest.mark.parametrize("row, line, col", [
    ("2023-11-16 18:15:51.0000000,12x,5", 3, 2),
    ("2023-13-16 18:15:51.0000000,12,5", 3, 1),
    ("2023-11-16 18:15:51.0000000,12,-5", 3, 3),
])
def test_malformed_row_names_line_and_column(tmp_path, row, line, col):
    path = tmp_path / "bad.csv"
    path.write_text(CSV.splitlines()[0] + "\n" + CSV.splitlines()[1] + "\n" + row + "\n")
    with pytest.raises(traces.TraceFormatError, match=rf"bad.csv:{line}: column {col} \("):
        traces.load_trace(path)


def test_short_row_and_bad_header(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text(CSV + "2023-11-16 18:15:51.0000000,12\n")
    with pytest.raises(traces.TraceFormatError, match="short.csv:6: expected 3 columns"):
        traces.load_trace(path)
    path.write_text("time,in,out\n")
    with pytest.raises(traces.TraceFormatError, match="short.csv:1: expected header"):
        traces.load_trace(path)


def test_missing_file_says_where_to_look():
    with pytest.raises(FileNotFoundError, match="data/traces"):
        traces.load_trace("no_such_trace.csv")


def test_shipped_traces_resolve_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    path = traces.resolve_trace_path("AzureLLMInferenceTrace_code.csv")
    with open(path) as f:
        assert f.readline().strip() == "TIMESTAMP,ContextTokens,GeneratedTokens"


def test_window_rebases_and_keeps_duration(trace_csv):
    w = traces.window(traces.load_trace(trace_csv), start_s=0.5, duration_s=1.0)
    assert w.arrivals == (0.0, 0.75)
    assert w.prompt_lens == (200, 300)
    assert w.duration_s == 1.0


def test_clip_lengths_fits_max_model_len(trace_csv):
    t = traces.clip_lengths(traces.load_trace(trace_csv), max_model_len=64, token_scale=0.1)
    assert t.prompt_lens == (10, 20, 30, 40)
    assert t.output_lens == (1, 2, 3, 4)
    t = traces.clip_lengths(traces.load_trace(trace_csv), max_model_len=250)
    assert t.prompt_lens == (100, 200, 249, 249)
    assert t.output_lens == (10, 20, 1, 1)


def test_mean_demand_exact():
    # one request: prompt 10, output 20 at 10 tok/s -> live 2 s, token-seconds 2 * (10 + 10) = 40
    t = traces.Trace((0.0,), (10,), (20,), 8.0)
    assert traces.mean_demand_tokens(t, decode_tps=10) == 5.0


def _sample_trace(n=400, seed=3):
    arrivals = traces.onoff_arrivals(n, base_rate=5, burst_rate=50, off_s=4, on_s=1, seed=seed)
    return traces.synthetic_trace(arrivals, 50, 30, len_jitter=0.5, seed=seed)


def test_compress_keeps_temporal_pattern_exactly():
    t = _sample_trace()
    up = traces.upscale(t, 4.0, "compress")
    # the same rate curve, 4x faster: window i of width w/4 holds what window i of width w held
    assert traces.rate_per_window(up.arrivals, 0.25, up.duration_s) == \
        [4 * r for r in traces.rate_per_window(t.arrivals, 1.0, t.duration_s)]


def test_replicate_keeps_temporal_pattern_exactly():
    t = _sample_trace()
    up = traces.upscale(t, 3.0, "replicate")
    assert len(up) == 3 * len(t)
    assert traces.rate_per_window(up.arrivals, 1.0, up.duration_s) == \
        [3 * r for r in traces.rate_per_window(t.arrivals, 1.0, t.duration_s)]


@pytest.mark.parametrize("mode, tol", [("compress", 1e-9), ("replicate", 0.05)])
def test_scale_to_demand_hits_target(mode, tol):
    t = _sample_trace()
    capacity = 20_000
    scaled, factor = traces.scale_to_demand(t, capacity, 0.6, decode_tps=20, mode=mode, seed=1)
    achieved = traces.mean_demand_tokens(scaled, 20) / capacity
    assert achieved == pytest.approx(0.6, rel=tol)
    assert factor == pytest.approx(0.6 * capacity / traces.mean_demand_tokens(t, 20))


def test_gamma_arrivals_mean_rate():
    for burstiness in (1.0, 0.25):
        a = traces.gamma_arrivals(20_000, rate=8.0, burstiness=burstiness, seed=0)
        gaps = [y - x for x, y in zip(a, a[1:])]
        assert statistics.fmean(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    # burstier arrivals have a larger coefficient of variation (1/sqrt(shape) for gamma)
    a = traces.gamma_arrivals(20_000, rate=8.0, burstiness=0.25, seed=0)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(2.0, rel=0.1)
    assert traces.gamma_arrivals(3, rate=float("inf")) == [0.0, 0.0, 0.0]


def test_onoff_bursts_land_in_on_phases():
    a = traces.onoff_arrivals(2000, base_rate=2, burst_rate=200, off_s=3, on_s=0.5, seed=0)
    period = 3.5
    in_burst = [t for t in a if t % period >= 3]
    assert len(a) == 2000 and a == sorted(a)
    # rates in each phase: 200/s over 0.5 s vs 2/s over 3 s -> about 100 vs 6 per period
    assert len(in_burst) / len(a) == pytest.approx(100 / 106, abs=0.03)


def test_work_items_use_trace_lengths():
    t = traces.Trace((0.0, 0.5), (3, 5), (7, 9), 1.0)
    items = traces.to_work_items(t, vocab_size=50, seed=0)
    assert [(i.delay_s, len(i.prompt), i.max_tokens) for i in items] == [(0.0, 3, 7), (0.5, 5, 9)]
    assert all(isinstance(i, WorkItem) and all(10 <= x < 50 for x in i.prompt) for i in items)
