"""Workloads shared by the simulator's test files."""

from __future__ import annotations

from kunserve.bench import traces

# Qwen-2.5-14B shape on an H100 (roofline clock) with a deliberately small KV cache, so a
# burst of a few hundred short requests overloads memory within seconds of simulated time.
SMALL = dict(instances=4, num_kv_blocks=200, min_hold_s=1.0)


def bursty(num=300, seed=3, input_len=400, output_len=150):
    arrivals = traces.onoff_arrivals(num, 5.0, 200.0, 2.0, 0.5, seed=seed)
    return traces.synthetic_trace(arrivals, input_len, output_len, 0.8, seed=seed)
