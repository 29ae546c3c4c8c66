"""Metric math on synthetic timestamps (exact values)."""

from __future__ import annotations

import math

import pytest

from kunserve.bench._metrics import RequestRecord, meets_slo, percentile, serving_metrics, summarize


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert math.isnan(percentile([], 50))
    assert summarize([5.0])["p99.9"] == 5.0


def test_request_ttft_tpot_itl_e2el():
    r = RequestRecord(send_time=10.0, token_times=(10.5, 10.7, 11.0, 11.5), output_tokens=4)
    assert r.ttft == 0.5 and r.e2el == 1.5
    assert r.tpot == pytest.approx(1.0 / 3)  # (E2EL - TTFT) / (tokens - 1), first token excluded
    assert r.itls == pytest.approx([0.2, 0.3, 0.5])
    assert RequestRecord(0.0, (1.0,), 1).tpot is None


def test_serving_metrics_aggregate_and_goodput():
    records = [
        RequestRecord(0.0, (1.0, 2.0), 2, prompt_tokens=10),
        RequestRecord(0.0, (3.0, 3.5, 4.0), 3, prompt_tokens=10),
        RequestRecord(1.0, (), 0, ok=False, error="boom"),
    ]
    m = serving_metrics(records, duration_s=4.0, slo_s={"ttft": 2.0})
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["request_throughput"] == 0.5 and m["output_throughput"] == 1.25
    assert m["total_token_throughput"] == 25 / 4
    assert m["ttft_s"]["mean"] == 2.0 and m["ttft_s"]["median"] == 2.0
    assert m["tpot_s"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["e2el_s"]["p90"] == pytest.approx(2.0 + 0.9 * 2.0)
    assert m["goodput"] == 0.25 and m["slo_violation_rate"] == pytest.approx(2 / 3)
    assert meets_slo(records[0], {"ttft": 1.0, "tpot": 1.0}) and not meets_slo(records[1], {"ttft": 1.0})
