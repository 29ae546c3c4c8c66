"""`--policy llumnix` (live migration) and `--policy vllm-pp` (static 2-stage pipelines) on real
torchrun ranks, token-exact against the single-instance engine."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

httpx = pytest.importorskip("httpx")

from kunserve import LLM, SamplingParams  # noqa: E402
from kunserve.bench._launch import LocalCluster  # noqa: E402
from test_cluster_serve import assert_clean_exit  # noqa: E402
from test_drop_serve import metric_values  # noqa: E402

# 16 blocks of 8 tokens per instance; each request grows to 8 + 100 tokens = 14 blocks, so three
# on one instance need 42 blocks: it preempts and queues (freeness < 0) for many steps.
SERVE_ARGS = ["--num-kv-blocks", "16", "--block-size", "8", "--max-model-len", "128",
              "--max-num-batched-tokens", "128"]
PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(8)] for i in range(6)]
GREEDY = dict(temperature=0, ignore_eos=True)
SEEDED = dict(temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
PARAMS = [GREEDY, SEEDED, GREEDY, GREEDY, SEEDED, GREEDY]  # seeded ones: the generator state moves too
MAX_TOKENS = 100


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=128, max_model_len=128)
    params = [SamplingParams(max_tokens=MAX_TOKENS, **p) for p in PARAMS]
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


async def _loads(client) -> dict[str, float]:
    """Requests held per instance (running + waiting), from /metrics."""
    values = metric_values((await client.get("/metrics")).text)
    loads: dict[str, float] = {}
    for name, value in values.items():
        if name.startswith(("kunserve_requests_running{", "kunserve_requests_waiting{")):
            instance = name.split('instance="')[1].split('"')[0]
            loads[instance] = loads.get(instance, 0) + value
    return loads


async def _stream_text(client, body: dict, first_token: asyncio.Event) -> str:
    texts = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts.append(json.loads(line.removeprefix("data: "))["choices"][0]["text"])
                first_token.set()
    return "".join(texts)


async def strand_one_instance(base_url: str) -> tuple[dict[int, str], str, str]:
    """Send the requests one at a time and see where each lands (the instance whose load grew by
    one when its first token arrived; /metrics is published before outputs are delivered). Then
    disconnect every request on the instance that got fewer: it empties while the other one is
    overloaded, whatever the dispatcher decided. Returns the kept requests' texts by index, the
    kept instance and the emptied one."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        placed, tasks = {}, {}
        before = await _loads(client)
        for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
            first = asyncio.Event()
            body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, **params}
            tasks[i] = asyncio.create_task(_stream_text(client, body, first))
            await asyncio.wait_for(first.wait(), 60)
            after = await _loads(client)
            grown = [k for k in after if after[k] > before.get(k, 0)]
            assert len(grown) == 1, (before, after)
            placed[i], before = grown[0], after
        counts = {k: sum(1 for v in placed.values() if v == k) for k in ("0", "1")}
        emptied = min(counts, key=lambda k: (counts[k], k))
        kept = "1" if emptied == "0" else "0"
        for i, task in tasks.items():
            if placed[i] == emptied:
                task.cancel()  # the client goes away: the server aborts the request
        texts = {i: await task for i, task in tasks.items() if placed[i] == kept}
    return texts, kept, emptied


def test_llumnix_migrates_running_requests_token_exact(llama_dir, reference):
    cluster = LocalCluster(llama_dir, 2, [*SERVE_ARGS, "--policy", "llumnix"], served_model_name="tiny")
    try:
        texts, kept, emptied = asyncio.run(strand_one_instance(cluster.base_url))
        metrics = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        children = cluster.child_processes()
    finally:
        code, out = cluster.stop()
    assert len(texts) >= 3 and texts == {i: reference[i] for i in texts}, out[-4000:]  # none lost
    assert metrics["kunserve_migrations_completed_total"] >= 1, out[-4000:]
    assert metrics["kunserve_migration_bytes_total"] > 0
    assert metrics["kunserve_migrations_started_total"] == (
        metrics["kunserve_migrations_completed_total"] + metrics["kunserve_migrations_aborted_total"])
    assert metrics["kunserve_migrations_inflight"] == 0
    # the overloaded instance handed running requests to the emptied one
    moves = re.findall(r"migrated request \S+ from instance (\d) to (\d)", out)
    assert (kept, emptied) in moves, out[-4000:]
    assert_clean_exit(code, [p for p in children if p.is_running() and p.status() != "zombie"], out, 2)


def test_vllm_pp_is_a_static_two_stage_pipeline_token_exact(llama_dir):
    prompts, params = PROMPTS[:4], SamplingParams(max_tokens=12, **GREEDY)
    llm = LLM(str(llama_dir), num_kv_blocks=128, max_model_len=128)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    # 6 blocks of 8 tokens for four requests of 3 blocks each at the end: the pipeline preempts.
    # No --pipeline-size: vllm-pp means 2 stages.
    args = ["--block-size", "8", "--max-model-len", "32", "--num-kv-blocks", "6", "--policy", "vllm-pp"]
    cluster = LocalCluster(llama_dir, 2, args, served_model_name="tiny")
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as client:
                bodies = [{"model": "tiny", "prompt": p, "max_tokens": 12, **GREEDY} for p in prompts]
                return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

        responses = asyncio.run(burst())
        metrics = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        children = cluster.child_processes()
    finally:
        code, out = cluster.stop()
    assert [r.status_code for r in responses] == [200] * len(prompts)
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    # one instance (the 2-stage pipeline of ranks 0 and 1), not two data-parallel ones
    assert [k for k in metrics if k.startswith("kunserve_kv_cache_total_blocks")] == [
        'kunserve_kv_cache_total_blocks{instance="0"}']
    assert metrics['kunserve_preemptions_total{instance="0"}'] > 0
    assert_clean_exit(code, [p for p in children if p.is_running() and p.status() != "zombie"], out, 2)
