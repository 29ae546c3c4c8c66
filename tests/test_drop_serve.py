"""The kunserve policy under a burst: instances merge into pipelines, token-exact (real torchrun)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

httpx = pytest.importorskip("httpx")

from kunserve import LLM, SamplingParams  # noqa: E402
from kunserve.bench._launch import LocalCluster  # noqa: E402
from test_cluster_serve import assert_clean_exit  # noqa: E402

PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)]
           for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 20, 4, 9, 12, 6, 7, 15, 22])]
# 12 blocks of 4 tokens per instance: the burst's queued demand is far beyond every instance.
SERVE_ARGS = ["--num-kv-blocks", "12", "--block-size", "4", "--max-model-len", "48",
              "--max-num-batched-tokens", "32", "--policy", "kunserve", "--memory", "vmm", "--restore-hold-s", "0.3"]


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=64)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def burst(base_url: str, prompts=PROMPTS) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        bodies = [{"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                  for p in prompts]
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(prompts)  # no request lost
    return [r.json() for r in responses]


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_burst_drops_then_load_falls_and_restores_token_exact(llama_dir, reference, nproc):
    cluster = LocalCluster(llama_dir, nproc, SERVE_ARGS, served_model_name="tiny")
    try:
        outputs = asyncio.run(burst(cluster.base_url))
        assert [o["choices"][0]["text"] for o in outputs] == reference
        metrics = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        # load has fallen to nothing: the idle cluster keeps stepping, pulls the weights back
        # and splits without any further request
        deadline, idle = time.monotonic() + 30, {}
        while time.monotonic() < deadline and idle.get("kunserve_restores_total", 0) < 1:
            time.sleep(0.2)
            idle = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        assert idle["kunserve_restores_total"] >= 1 and idle["kunserve_pipeline_groups"] == 0
        light = asyncio.run(burst(cluster.base_url, PROMPTS[:nproc]))
        assert [o["choices"][0]["text"] for o in light] == reference[:nproc]
        after = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        children = cluster.child_processes()
    finally:
        code, out = cluster.stop()
    assert metrics["kunserve_drops_total"] >= 1 and metrics["kunserve_kv_bytes_exchanged_total"] > 0
    # capacity after each drop equals the planner's prediction (from rank 0's and members' logs)
    predicted = [(m.group(1), int(m.group(2))) for m in
                 re.finditer(r"merge into pipeline (\([\d, ]+\)) .*predicted capacity (\d+) blocks", out)]
    actual = {(m.group(1), int(m.group(2))) for m in
              re.finditer(r"merged into group (\([\d, ]+\)) as stage .*\(group (\d+)\)", out)}
    assert predicted and set(predicted) == actual
    assert after["kunserve_restores_total"] >= 1 and after["kunserve_drops_total"] >= metrics["kunserve_drops_total"]
    assert after["kunserve_restore_bytes_total"] > 0  # weights (and any KV) came back from the peers
    assert "left group" in out  # members pulled weights back and served alone again
    assert_clean_exit(code, [p for p in children if p.is_running() and p.status() != "zombie"], out, nproc)


def test_vllm_policy_under_the_same_burst_recomputes_token_exact(llama_dir, reference):
    """The baseline on the identical burst: no drop, recompute preemptions, same outputs."""
    args = [("vllm" if a == "kunserve" else a) for a in SERVE_ARGS]
    cluster = LocalCluster(llama_dir, 2, args, served_model_name="tiny")
    try:
        outputs = asyncio.run(burst(cluster.base_url))
        metrics = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
    finally:
        cluster.stop()
    assert [o["choices"][0]["text"] for o in outputs] == reference
    assert sum(v for k, v in metrics.items() if k.startswith("kunserve_preemptions_total")) > 0
    assert "kunserve_drops_total" not in metrics
