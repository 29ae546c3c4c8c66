"""AsyncEngine: one engine thread, asyncio callers, every request gets exactly one end."""

from __future__ import annotations

import asyncio
import time

import pytest

from kunserve import LLM, EngineConfig, SamplingParams
from kunserve.serving import AsyncEngine, EngineClient, EngineUnavailableError

pytest.importorskip("pydantic")

ENGINE_ARGS = dict(num_kv_blocks=64, max_model_len=128)
GREEDY = SamplingParams(temperature=0, max_tokens=12)
LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Hello, how are you?", "A serving cluster", "Once upon a time"]


@pytest.fixture(scope="module")
def reference(llama_dir):
    return LLM(model=str(llama_dir), **ENGINE_ARGS)


@pytest.fixture
def make_engine(llama_dir):
    engines = []

    def make(**kwargs) -> AsyncEngine:
        engines.append(AsyncEngine.from_config(EngineConfig(model=str(llama_dir), **ENGINE_ARGS), **kwargs))
        return engines[-1]

    yield make
    for engine in engines:
        asyncio.run(engine.shutdown(0))


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> dict:
    """Poll the published snapshot until nothing runs, waits or holds KV blocks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = engine.metrics_snapshot()
        inst = snap["instances"]["0"]
        if inst["requests_running"] == inst["requests_waiting"] == 0 and inst["kv_cache_free_blocks"] == 64:
            return snap
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.metrics_snapshot()}")


def test_is_an_engine_client(make_engine):
    assert isinstance(make_engine(), EngineClient)


def test_greedy_outputs_match_offline_llm(make_engine, reference):
    engine = make_engine()

    async def main():
        return await asyncio.gather(*(collect(engine, p, GREEDY, str(i)) for i, p in enumerate(PROMPTS)))

    results = asyncio.run(main())
    expected = reference.generate(PROMPTS, GREEDY, use_tqdm=False)
    for outs, ref in zip(results, expected):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        assert outs[-1].outputs[0].text == ref.outputs[0].text
        # each output extends the previous one (merged steps allowed)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[0] >= 1


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", GREEDY, "empty"),
        ([10**6], GREEDY, "outside the vocabulary"),
        ([5] * 128, GREEDY, "max_model_len is 128"),
        ([5] * 100, SamplingParams(max_tokens=40), r"requested 140 tokens \(100 in the prompt, 40"),
    ],
)
def test_bad_input_raises_before_anything_is_queued(make_engine, prompt, params, match):
    engine = make_engine()

    async def main():
        gen = engine.generate(prompt, params, "bad")
        with pytest.raises(ValueError, match=match):
            await anext(gen)

    asyncio.run(main())
    snap = wait_idle(engine)
    assert snap["prompt_tokens_total"] == 0 and sum(snap["requests_total"].values()) == 0


def test_duplicate_request_id_is_refused_and_original_unharmed(make_engine, reference):
    engine = make_engine()

    async def main():
        first = asyncio.create_task(collect(engine, PROMPTS[0], LONG, "same"))
        await asyncio.sleep(0.01)
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, PROMPTS[1], GREEDY, "same")
        return await first

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].token_ids == reference.generate(PROMPTS[0], LONG, use_tqdm=False)[0].outputs[0].token_ids


def test_abort_ends_the_stream_and_frees_blocks(make_engine):
    engine = make_engine()

    async def main():
        gen = engine.generate(PROMPTS[0], LONG, "r")
        first = await anext(gen)
        await engine.abort("r")
        rest = [o async for o in gen]
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert wait_idle(engine)["requests_total"]["abort"] == 1


def test_closing_the_iterator_aborts_the_request(make_engine):
    engine = make_engine()

    async def main():
        gen = engine.generate(PROMPTS[0], LONG, "r")
        await anext(gen)
        await gen.aclose()

    asyncio.run(main())
    assert wait_idle(engine)["requests_total"]["abort"] == 1
    assert not engine.engine.has_unfinished_requests()


def test_cancelled_caller_aborts_the_request(make_engine):
    engine = make_engine()

    async def main():
        task = asyncio.create_task(collect(engine, PROMPTS[0], LONG, "r"))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_idle(engine)


@pytest.mark.parametrize("drain", [0.0, 30.0])
def test_shutdown_ends_every_in_flight_request(make_engine, drain):
    engine = make_engine()

    async def main():
        tasks = [asyncio.create_task(collect(engine, p, LONG, str(i))) for i, p in enumerate(PROMPTS * 2)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(engine.shutdown(drain), timeout=30)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await collect(engine, PROMPTS[0], GREEDY, "late")
        return results

    results = asyncio.run(main())
    reasons = {outs[-1].outputs[0].finish_reason for outs in results}
    assert all(outs[-1].finished for outs in results)
    assert reasons == ({"length"} if drain else {"abort", "length"} & reasons) and reasons
    if not drain:
        assert "abort" in reasons
    assert not engine.is_healthy()


def test_a_crashed_step_fails_every_waiting_request(make_engine):
    engine = make_engine()
    real_step, calls = engine.engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step()

    engine.engine.step = flaky_step

    async def main():
        tasks = [asyncio.create_task(collect(engine, p, LONG, str(i))) for i, p in enumerate(PROMPTS)]
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        with pytest.raises(EngineUnavailableError, match="boom"):
            await collect(engine, PROMPTS[0], GREEDY, "late")
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, EngineUnavailableError) and "boom" in str(r) for r in results)
    assert not engine.is_healthy()
    assert engine.metrics_snapshot()["requests_total"]["error"] == len(PROMPTS)


def test_idle_thread_sleeps(make_engine):
    engine = make_engine()
    asyncio.run(collect(engine, PROMPTS[0], GREEDY, "warm"))
    wait_idle(engine)
    time.sleep(0.2)  # let OpenMP worker threads stop spin-waiting after the last step
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.1  # a spinning thread would burn ~0.3 s
    assert engine.is_healthy()


def test_metrics_snapshot_counts(make_engine):
    engine = make_engine()
    before = engine.metrics_snapshot()
    asyncio.run(collect(engine, [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "m"))
    after = wait_idle(engine)
    assert before["requests_total"]["length"] == 0 and after["requests_total"]["length"] == 1
    assert after["prompt_tokens_total"] == 3 and after["generation_tokens_total"] == 4
    inst = after["instances"]["0"]
    assert inst["kv_cache_total_blocks"] == 64 and inst["kv_cache_usage"] == 0.0
    assert inst["preemptions_total"] == 0


def test_drives_a_single_rank_cluster_driver(llama_dir, reference):
    """kunserve.serve wraps a ClusterDriver (engine-like surface) in AsyncEngine."""
    from kunserve import LLMEngine
    from kunserve.runtime.cluster import ClusterDriver

    engine = AsyncEngine(ClusterDriver(LLMEngine(EngineConfig(model=str(llama_dir), **ENGINE_ARGS))))

    async def main():
        outs = await collect(engine, PROMPTS[1], GREEDY, "c")
        gen = engine.generate(PROMPTS[0], LONG, "aborted-by-shutdown")
        await anext(gen)
        await engine.shutdown(0)
        return outs, [o async for o in gen]

    outs, rest = asyncio.run(main())
    ref = reference.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0]
    assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
    assert rest[-1].outputs[0].finish_reason == "abort"
    assert set(engine.metrics_snapshot()["instances"]) == {"0"}
