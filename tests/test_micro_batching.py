"""Micro-batched pipeline steps: the batcher's split reaches every stage, outputs stay
token-exact, and the bubble measurement is exported (real torchrun, 2 stages)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from kunserve import LLM, SamplingParams
from kunserve.policy.batching import LookaheadBatcher, TokenBudgetBatcher
from kunserve.policy.cost_model import CostModel
from kunserve.runtime.pipeline_step import StageChunk, form_micro_batches
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import ScheduledChunk, SchedulerOutput

PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 45, 4, 9, 12])]
SERVE_ARGS = ["--num-kv-blocks", "24", "--block-size", "4", "--max-model-len", "64", "--max-num-batched-tokens", "32",
              "--policy", "vllm-pp"]
# Attention-heavy enough that lookahead's cuts differ from equal token counts.
COST = CostModel(a=2e-7, b=1e-7, f=1e-5, d=2e-4, lam=1e-4)


def request(rid: str, prompt_len: int, computed: int) -> Request:
    r = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(temperature=0), 100, ())
    r.num_computed_tokens = computed
    return r


def test_pieces_keep_prefixes_and_only_the_last_piece_samples():
    long, decode = request("long", 40, 8), request("dec", 20, 19)
    plan = SchedulerOutput((ScheduledChunk(long, 32), ScheduledChunk(decode, 1)))  # long completes its prompt
    mbs = form_micro_batches(plan, TokenBudgetBatcher(max_tokens=12))
    assert mbs == (
        (StageChunk("long", 8, 12, False),),
        (StageChunk("long", 20, 12, False),),
        (StageChunk("long", 32, 8, True), StageChunk("dec", 19, 1, True)),
    )
    assert form_micro_batches(plan, None) == ((StageChunk("long", 8, 32, True), StageChunk("dec", 19, 1, True)),)
    assert form_micro_batches(SchedulerOutput(()), TokenBudgetBatcher(max_tokens=12)) == ()
    balanced = form_micro_batches(plan, LookaheadBatcher(COST, min_tokens=4))
    assert len(balanced) > 1
    pieces = [c for mb in balanced for c in mb if c.request_id == "long"]
    assert [(c.start, c.num_tokens) for c in pieces][0][0] == 8 and pieces[-1].start + pieces[-1].num_tokens == 40
    assert all(a.start + a.num_tokens == b.start for a, b in zip(pieces, pieces[1:]))  # contiguous, in order
    assert [c.completes for c in pieces] == [False] * (len(pieces) - 1) + [True]


httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=64)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


async def complete_all(base_url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        bodies = [{"model": "tiny", "prompt": p, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
                  for p in PROMPTS]
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    return [r.json()["choices"][0]["text"] for r in responses]


@pytest.mark.parametrize("batching", ["token-budget", "lookahead"])
def test_micro_batched_pipeline_is_token_exact_and_reports_bubbles(llama_dir, reference, tmp_path, batching):
    from kunserve.bench._launch import LocalCluster
    from test_drop_serve import metric_values

    extra = ["--micro-batching", batching]
    if batching == "token-budget":
        extra += ["--micro-batch-tokens", "8"]
    else:
        profile = tmp_path / "profile.json"
        profile.write_text(json.dumps({"cost_model": {"a": COST.a, "b": COST.b, "f": COST.f, "d": COST.d,
                                                      "lambda": COST.lam},
                                       "token_linear": {"alpha": 1e-5, "beta": 1e-4}, "min_tokens": 4}))
        extra += ["--cost-profile", str(profile)]
    step_log = tmp_path / "steps.jsonl"
    extra += ["--pipeline-step-log", str(step_log)]
    cluster = LocalCluster(llama_dir, 2, [*SERVE_ARGS, *extra], served_model_name="tiny")
    cores = sorted(os.sched_getaffinity(0))
    try:
        with cluster.pinned_to_cores() as pinned:  # as benchmarks/pipeline_bubble.py --pin-cores runs it
            assert pinned == {0: cores[0], 1: cores[1 % len(cores)]}
            for proc in cluster.child_processes():
                rank = proc.environ().get("LOCAL_RANK")
                if rank is not None:
                    assert {os.sched_getaffinity(t.id) == {pinned[int(rank)]} for t in proc.threads()} == {True}
            assert os.sched_getaffinity(0) == {cores[0]}  # the load client, beside rank 0's server
            assert asyncio.run(complete_all(cluster.base_url)) == reference
            metrics = metric_values(httpx.get(f"{cluster.base_url}/metrics").text)
        assert sorted(os.sched_getaffinity(0)) == cores
    finally:
        cluster.stop()
    assert metrics["kunserve_pipeline_steps_total"] > 0
    idle = {k: v for k, v in metrics.items() if k.startswith("kunserve_pipeline_idle_fraction")}
    assert set(idle) == {'kunserve_pipeline_idle_fraction{rank="0"}', 'kunserve_pipeline_idle_fraction{rank="1"}'}
    assert all(0 < v < 1 for v in idle.values())
    assert 0 < metrics["kunserve_pipeline_bubble_fraction"] < 1
    # the step log holds the very timings the metrics sum: one line per step, same bubble
    steps = [json.loads(line) for line in step_log.read_text().splitlines()]
    assert len(steps) == metrics["kunserve_pipeline_steps_total"]
    assert {s["leader"] for s in steps} == {0} and all(set(s["busy_s"]) == {"0", "1"} for s in steps)
    assert all(sum(s["micro_batches"]) == s["tokens"] > 0 for s in steps)
    if batching == "token-budget":
        assert max(n for s in steps for n in s["micro_batches"]) <= 8  # --micro-batch-tokens 8
        assert any(len(s["micro_batches"]) > 1 for s in steps)
    wall = sum(s["wall_s"] for s in steps)
    busy = sum(b for s in steps for b in s["busy_s"].values())
    assert 1 - busy / (2 * wall) == pytest.approx(metrics["kunserve_pipeline_bubble_fraction"], rel=1e-6)


def test_serve_refuses_a_step_log_it_cannot_write(tmp_path):
    from kunserve import serve

    with pytest.raises(SystemExit, match="--pipeline-step-log .*cannot append to it"):
        serve.main(["--model", "unused", "--pipeline-step-log", str(tmp_path / "missing" / "steps.jsonl")])
