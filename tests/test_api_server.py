"""The OpenAI-compatible server: real uvicorn on 127.0.0.1, real httpx / openai clients."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kunserve import LLM, EngineConfig, SamplingParams  # noqa: E402
from kunserve.serving import AsyncEngine  # noqa: E402
from kunserve.serving.api_server import build_app, make_server  # noqa: E402
from kunserve.serving.metrics import render_metrics  # noqa: E402
from kunserve.serving.protocol import TextDeltas  # noqa: E402
from test_async_engine import wait_idle  # noqa: E402

MODEL = "tiny-llama"
ENGINE_ARGS = dict(num_kv_blocks=64, max_model_len=128)
PROMPTS = ["The quick brown fox", "Hello, how are you?", "A serving cluster", "Once upon a time"]
LONG_IDS = [20 + i % 50 for i in range(8)]  # a token-id prompt whose greedy stream runs long


@pytest.fixture(scope="module")
def reference(llama_dir):
    return LLM(model=str(llama_dir), **ENGINE_ARGS)


def start_server(llama_dir, **engine_kwargs):
    """(server, thread, base url, AsyncEngine) of a live uvicorn server in a background thread."""
    engine = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), **ENGINE_ARGS), **engine_kwargs)
    srv = make_server(engine, served_model_name=MODEL, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    return srv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}", engine


@pytest.fixture(scope="module")
def server(llama_dir):
    """(base url, AsyncEngine) of a live server; shut down (engine included) at module end."""
    srv, thread, base, engine = start_server(llama_dir)
    yield base, engine
    srv.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], timeout=30) as client:
        yield client


def greedy(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, **extra}


def stream(http, path: str, body: dict) -> list:
    """Parsed `data:` payloads of an SSE response, which must end with [DONE]."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# -- correctness ---------------------------------------------------------------------------------
def test_completions_match_offline_llm(http, reference):
    expected = reference.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, expected):
        body = http.post("/v1/completions", json={**greedy(12), "prompt": prompt}).raise_for_status().json()
        assert body["object"] == "text_completion" and body["model"] == MODEL
        choice = body["choices"][0]
        assert choice["text"] == ref.outputs[0].text
        assert choice["finish_reason"] == ref.outputs[0].finish_reason
        p, c = len(ref.prompt_token_ids), len(ref.outputs[0].token_ids)
        assert body["usage"] == {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def test_token_id_prompts_match_offline_llm(http, reference):
    prompts = [LONG_IDS, [5, 6, 7], [100, 200, 300, 42]]
    expected = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    for prompt, ref in zip(prompts, expected):
        body = http.post("/v1/completions", json={**greedy(20), "prompt": prompt}).json()
        assert body["choices"][0]["text"] == ref.outputs[0].text
        assert body["usage"]["prompt_tokens"] == len(prompt)
        assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
    # a batch of one prompt is accepted too
    body = http.post("/v1/completions", json={**greedy(20), "prompt": [prompts[1]]}).json()
    assert body["choices"][0]["text"] == expected[1].outputs[0].text


def test_chat_matches_offline_llm(http, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    ref = reference.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    for extra in ({"max_tokens": 12}, {"max_completion_tokens": 12, "max_tokens": 99}):
        body = http.post("/v1/chat/completions", json={**greedy(12), **extra, "messages": messages}).json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.outputs[0].text}
        assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             messages[1]]
    body = http.post("/v1/chat/completions", json={**greedy(12), "messages": parts}).json()
    assert body["choices"][0]["message"]["content"] == ref.outputs[0].text


def test_streaming_deltas_concatenate_to_the_full_text(http):
    for prompt in [PROMPTS[0], LONG_IDS]:
        full = http.post("/v1/completions", json={**greedy(60), "prompt": prompt}).json()
        chunks = stream(http, "/v1/completions", {**greedy(60), "prompt": prompt,
                                                  "stream_options": {"include_usage": True}})
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert "".join(texts) == full["choices"][0]["text"]
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == full["choices"][0]["finish_reason"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
        assert all(not t.endswith("\ufffd") for t in texts[:-1])  # held back until complete


def test_streaming_chat_shapes(http, reference):
    messages = [{"role": "user", "content": "Once upon a time"}]
    ref = reference.chat(messages, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    chunks = stream(http, "/v1/chat/completions", {**greedy(30), "messages": messages})
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == ref.outputs[0].text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == ref.outputs[0].finish_reason and set(finishes[:-1]) == {None}


def test_text_deltas_hold_back_incomplete_characters_and_stop_prefixes():
    deltas = TextDeltas()
    steps = [("a", False), ("a\ufffd", False), ("a\ufffd\ufffd", False), ("a€", False), ("a€\ufffdb", False),
             ("a€\ufffdb\ufffd", True)]
    out = [deltas.next(text, final) for text, final in steps]
    assert out == ["a", "", "", "€", "\ufffdb", "\ufffd"] and "".join(out) == steps[-1][0]
    stops = TextDeltas(stop=("fox",))
    out = [stops.next(t, f) for t, f in [("the", False), ("the f", False), ("the fo", False), ("the ", True)]]
    assert "".join(out) == "the "


def test_stop_strings_stream_and_truncate(http, reference):
    ref = reference.generate(LONG_IDS, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    stop = ref.outputs[0].text[5:8]
    assert stop and "\ufffd" not in stop
    body = {**greedy(40), "prompt": LONG_IDS, "stop": [stop]}
    full = http.post("/v1/completions", json=body).json()["choices"][0]
    assert full["finish_reason"] == "stop" and full["stop_reason"] == stop and stop not in full["text"]
    chunks = stream(http, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]


def test_max_tokens_defaults_to_what_fits(http):
    prompt = list(range(10, 40))
    body = http.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 128 - len(prompt) and body["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(http, server):
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]

    def samples() -> dict:
        r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out = {}
        for line in r.text.splitlines():
            if line.startswith("#") or not line:
                continue
            m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\S+)', line)
            assert m, f"bad sample line {line!r}"
            out[m.group(1) + (m.group(2) or "")] = float(m.group(4))
        return out

    before = samples()
    for name in ["requests_running", "requests_waiting", "kv_cache_usage", "preemptions_total"]:
        assert f'kunserve_{name}{{instance="0"}}' in before
    http.post("/v1/completions", json={**greedy(3), "prompt": "Hello", "ignore_eos": True})
    http.post("/v1/completions", json={"prompt": "Hello", "model": "nope"})
    after = samples()
    key = 'kunserve_requests_total{finish_reason="length"}'
    assert after[key] == before[key] + 1
    assert after["kunserve_generation_tokens_total"] >= before["kunserve_generation_tokens_total"] + 3
    assert after['kunserve_http_responses_total{code="404"}'] >= 1


def test_render_metrics_of_an_extended_snapshot():
    text = render_metrics({
        "instances": {"0": {"requests_running": 2, "kv_cache_usage": 0.5}, "1": {"requests_running": 1}},
        "requests_total": {"stop": 3}, "drops_total": {'a"b\\': 1}, "restore_seconds": float("nan"),
        "note": "skipped", "healthy": True,
    })
    assert text.splitlines()[:4] == [
        "# HELP kunserve_requests_running Requests holding KV blocks and being stepped.",
        "# TYPE kunserve_requests_running gauge",
        'kunserve_requests_running{instance="0"} 2', 'kunserve_requests_running{instance="1"} 1']
    for line in ['kunserve_requests_total{finish_reason="stop"} 3', "# TYPE kunserve_drops_total counter",
                 'kunserve_drops_total{key="a\\"b\\\\"} 1', "kunserve_restore_seconds NaN", "kunserve_healthy 1"]:
        assert line in text.splitlines()
    assert "note" not in text and text.endswith("\n")


def test_health_503_when_the_client_is_unhealthy(server):
    from fastapi.testclient import TestClient

    sick = type("Sick", (), {"max_model_len": 128, "tokenizer": None, "is_healthy": lambda self: False})()
    r = TestClient(build_app(sick, MODEL)).get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "unhealthy"


# -- concurrency ---------------------------------------------------------------------------------
def test_64_concurrent_clients_all_get_complete_answers(server, reference):
    base, engine = server
    expected = {p: r.outputs[0].text for p, r in zip(PROMPTS, reference.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False))}

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {**greedy(16), "prompt": prompt}
        if i % 2:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return prompt, r.json()["choices"][0]["text"]
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        return prompt, "".join(c["choices"][0]["text"] for c in chunks)

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(text == expected[prompt] for prompt, text in results)
    wait_idle(engine)


C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS = [  # (path, raw body or json, status, message fragment)
    (C, b'{"prompt": "x", ', 400, "not valid JSON"),
    (C, b"[1, 2]", 400, "must be a JSON object"),
    (C, {"model": MODEL}, 400, "missing required field 'prompt'"),
    (CHAT, {"model": MODEL}, 400, "missing required field 'messages'"),
    (CHAT, {"messages": "hi"}, 400, "'messages'"),
    (CHAT, {"messages": []}, 400, "'messages'"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "missing required field 'messages.0.role'"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "'image_url' is not supported"),
    (C, {"prompt": 5}, 400, "'prompt'"),
    (C, {"prompt": "x", "max_tokens": "5"}, 400, "'max_tokens': Input should be a valid integer"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "'temperature'"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "gpt-4"),
    (C, {"prompt": list(range(10, 110)), "max_tokens": 40}, 400, "maximum context length is 128 tokens. "
     "However, you requested 140 tokens (100 in the prompt, 40 in the completion)"),
    (CHAT, {"messages": [{"role": "user", "content": "x " * 100}]}, 400, "maximum context length is 128 tokens"),
    (C, {"prompt": list(range(10, 210))}, 400, "your prompt resulted in 200 tokens"),
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    (C, {"prompt": "x", "n": 2}, 400, "n=2 is not supported"),
    (C, {"prompt": ""}, 400, "prompt is empty"),
    (C, {"prompt": [5, 10**6]}, 400, "outside the vocabulary"),
    (C, {"prompt": ["a", "b"]}, 400, "batched prompts are not supported"),
    (C, b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "exceeds the limit of 1048576 bytes"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


def test_bad_requests_get_openai_errors_while_a_stream_continues(server, reference, http):
    base, _ = server
    alone = reference.generate(LONG_IDS, SamplingParams(temperature=0, max_tokens=110, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].text
    runs, errors, done = [], [], threading.Event()

    def keep_streaming():  # back-to-back streams, so one is always in flight while errors go out
        with httpx.Client(base_url=base, timeout=30) as c:
            while not done.is_set() or not runs:
                runs.append(stream(c, "/v1/completions", {**greedy(110), "prompt": LONG_IDS, "ignore_eos": True}))

    streamer = threading.Thread(target=keep_streaming)
    streamer.start()
    for path, body, status, fragment in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        err = r.json().get("error", {})
        if r.status_code != status or fragment not in err.get("message", ""):
            errors.append((path, body if not isinstance(body, bytes) else body[:40], r.status_code, r.text[:300]))
        assert set(err) == {"message", "type", "param", "code"}
    chunked = http.post("/v1/completions", content=iter([b"y" * 65536] * 20))  # no Content-Length
    assert chunked.status_code == 413
    done.set()
    streamer.join(timeout=30)
    assert not errors, errors
    assert len(runs) >= 2
    for chunks in runs:
        assert "".join(c["choices"][0]["text"] for c in chunks) == alone
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- disconnects ---------------------------------------------------------------------------------
def test_client_disconnect_aborts_the_request(server, http):
    base, engine = server
    aborts = wait_idle(engine)["requests_total"]["abort"]
    body = {**greedy(115), "prompt": LONG_IDS, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()  # read two chunks, then hang up
        assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data: ")
    assert wait_idle(engine)["requests_total"]["abort"] == aborts + 1
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks

    async def send_and_give_up():  # non-streaming: the client goes away mid-request
        async with httpx.AsyncClient(base_url=base) as c:
            task = asyncio.create_task(c.post("/v1/completions", json=body))
            await asyncio.sleep(0.1)
            task.cancel()

    asyncio.run(send_and_give_up())
    assert wait_idle(engine)["requests_total"]["abort"] == aborts + 2


# -- official client -----------------------------------------------------------------------------
def test_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    ref = reference.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    events = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(e.choices[0].delta.content or "" for e in events) == ref.outputs[0].text
    done = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    ref = reference.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert done.choices[0].text == ref.outputs[0].text and done.usage.completion_tokens == 12
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=500)


# -- shutdown ------------------------------------------------------------------------------------
def test_server_shutdown_ends_every_in_flight_request(llama_dir):
    srv, thread, base, engine = start_server(llama_dir)
    ended: list[str] = []

    def client(i: int) -> None:
        body = {**greedy(115), "prompt": LONG_IDS, "ignore_eos": True}
        with httpx.Client(base_url=base, timeout=30) as c:
            if i % 2:
                r = c.post("/v1/completions", json=body)
                ended.append("ok" if r.status_code == 200 else r.json()["error"]["code"])
                return
            events = stream(c, "/v1/completions", body)
            ended.append("ok" if "choices" in events[-1] else events[-1]["error"]["code"])

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 5
    while engine.metrics_snapshot()["instances"]["0"]["requests_running"] < 6 and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.should_exit = True
    for t in [thread, *clients]:
        t.join(timeout=15)
    assert not thread.is_alive() and not any(t.is_alive() for t in clients)
    assert len(ended) == 6 and set(ended) <= {"ok", "aborted"} and "aborted" in ended, ended
    assert not engine.is_healthy()
