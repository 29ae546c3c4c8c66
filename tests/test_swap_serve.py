"""The swap policy under a burst on real torchrun ranks: preempted KV goes to host memory and
back, token-exact, no request lost, swapped bytes visible in /metrics."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")

from kunserve import LLM, SamplingParams  # noqa: E402
from kunserve.bench._launch import LocalCluster  # noqa: E402
from test_cluster_serve import assert_clean_exit  # noqa: E402
from test_drop_serve import PROMPTS, burst, metric_values  # noqa: E402  (the same burst as the drop test)

# 12 blocks of 4 tokens per instance: the burst's 8 requests per instance cannot all stay
# resident, so running requests are preempted (and swapped) again and again.
SERVE_ARGS = ["--num-kv-blocks", "12", "--block-size", "4", "--max-model-len", "48",
              "--max-num-batched-tokens", "32", "--policy", "swap", "--swap-space-bytes", str(1 << 20)]


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=64)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions == 0
    return [o.outputs[0].text for o in outputs]


def summed(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(f"kunserve_{name}{{"))


def test_burst_swaps_token_exact_on_two_ranks(llama_dir, reference):
    cluster = LocalCluster(llama_dir, 2, SERVE_ARGS, served_model_name="tiny")
    try:
        outputs = asyncio.run(burst(cluster.base_url))  # asserts every request answered 200
        metrics = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        children = cluster.child_processes()
    finally:
        code, out = cluster.stop()
    assert [o["choices"][0]["text"] for o in outputs] == reference
    assert all(o["choices"][0]["finish_reason"] == "length" for o in outputs)
    swapped_out = summed(metrics, "swapped_out_bytes_total")
    assert swapped_out > 0 and summed(metrics, "swapped_in_bytes_total") == swapped_out  # all came back
    assert summed(metrics, "swap_preemptions_total") == summed(metrics, "preemptions_total") > 0
    assert summed(metrics, "recompute_fallbacks_total") == 0
    assert {k for k in metrics if k.startswith("kunserve_swapped_out_bytes_total{")} == {
        'kunserve_swapped_out_bytes_total{instance="0"}', 'kunserve_swapped_out_bytes_total{instance="1"}'}
    assert_clean_exit(code, [p for p in children if p.is_running() and p.status() != "zombie"], out, 2)
