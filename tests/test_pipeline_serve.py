"""Static pipeline groups (`--pipeline-size`): token-exact against the single-instance engine."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")

from kunserve import LLM, SamplingParams  # noqa: E402
from kunserve.bench._launch import LocalCluster  # noqa: E402
from test_cluster_serve import assert_clean_exit  # noqa: E402

PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 45, 4, 9, 12])]
SEEDED = dict(temperature=0.9, top_p=0.9, seed=7)
# A 24-block pool of 4 tokens with a 16-token budget: prefills are chunked and requests preempted.
SERVE_ARGS = ["--num-kv-blocks", "24", "--block-size", "4", "--max-model-len", "64", "--max-num-batched-tokens", "16"]


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=64)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    seeded = llm.generate(PROMPTS[:4], SamplingParams(max_tokens=12, ignore_eos=True, **SEEDED), use_tqdm=False)
    return [o.outputs[0].text for o in greedy], [o.outputs[0].text for o in seeded]


async def complete_all(base_url: str, prompts, **sampling) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        bodies = [{"model": "tiny", "prompt": p, "max_tokens": 12, "ignore_eos": True, **sampling} for p in prompts]
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(prompts)
    return [r.json() for r in responses]


# Steps overlap across stages by default (request sets in flight); "lockstep" drains every step.
@pytest.mark.parametrize("nproc,pipeline,overlap", [(2, 2, "on"), (3, 3, "on"), (4, 2, "on"), (2, 2, "off")],
                         ids=["1x2-stages", "1x3-stages", "2x2-stages", "1x2-stages-lockstep"])
def test_pipeline_groups_are_token_exact(llama_dir, reference, nproc, pipeline, overlap):
    greedy_ref, seeded_ref = reference
    cluster = LocalCluster(llama_dir, nproc, [*SERVE_ARGS, "--pipeline-size", str(pipeline), "--pipeline-overlap", overlap],
                           served_model_name="tiny")
    try:
        greedy = asyncio.run(complete_all(cluster.base_url, PROMPTS, temperature=0))
        assert [o["choices"][0]["text"] for o in greedy] == greedy_ref
        seeded = asyncio.run(complete_all(cluster.base_url, PROMPTS[:4], **SEEDED))
        assert [o["choices"][0]["text"] for o in seeded] == seeded_ref  # the last stage samples
        metrics = httpx.get(f"{cluster.base_url}/metrics").text
        instances = {line.split('instance="')[1].split('"')[0] for line in metrics.splitlines()
                     if line.startswith("kunserve_preemptions_total{")}
        assert instances == {str(i) for i in range(nproc // pipeline)}  # one instance per group
        preemptions = sum(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("kunserve_preemptions_total{"))
        assert preemptions > 0  # the small pool really preempted inside the pipeline
        continued = sum(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("kunserve_prefill_chunks_continued_total{"))
        # overlapped: 45-token prompts in 16-token steps ride in the other sets' steps too
        assert (continued > 0) == (overlap == "on")
        survivors_before = cluster.child_processes()
    finally:
        code, out = cluster.stop()
    assert_clean_exit(code, [p for p in survivors_before if p.is_running() and p.status() != "zombie"], out, nproc)
