"""`torchrun -m kunserve.serve` with 2 and 4 real ranks (gloo) and a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from kunserve import LLM, SamplingParams  # noqa: E402
from kunserve.bench._launch import LocalCluster  # noqa: E402

MODEL = "tiny"
ENGINE_ARGS = dict(num_kv_blocks=48, block_size=8, max_model_len=128)
PROMPT_IDS = [[1 + (7 * i + 3 * j) % 300 for j in range(4 + 3 * i)] for i in range(8)]


class Cluster(LocalCluster):
    def __init__(self, model_dir, nproc: int):
        super().__init__(model_dir, nproc, ["--num-kv-blocks", "48", "--block-size", "8", "--max-model-len", "128"],
                         served_model_name=MODEL, startup_timeout_s=180)
        self.base = self.base_url

    def ranks(self) -> list:
        return self.child_processes()

    def stop(self, timeout_s: float = 60) -> tuple[int, list, str]:
        """SIGTERM torchrun as a user's Ctrl-C would; returns (exit code, survivors, output)."""
        children = self.ranks()
        code, out = super().stop(timeout_s)
        survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        return code, survivors, out


def assert_clean_exit(code, survivors, out, nproc):
    """Every rank ran its orderly shutdown and no process is left. torchrun itself re-raises the
    SIGTERM it was sent (its exit code is 1 by design), so the ranks' own logs are the evidence."""
    assert survivors == [], f"orphan ranks: {survivors}"
    for rank in range(nproc):
        assert f"rank {rank} exited cleanly" in out, out[-4000:]
    assert re.search(r"\[rank\d+\]: Traceback", out) is None, out[-4000:]  # no rank crashed
    assert code in (0, 1), out[-4000:]


@pytest.fixture(scope="module")
def expected(llama_dir):
    llm = LLM(str(llama_dir), **ENGINE_ARGS)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPT_IDS, params, use_tqdm=False)]


def complete(client, prompt, max_tokens=16, **extra):
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


async def many_clients(base: str, n: int) -> list:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def one(i):
            body = {"model": MODEL, "prompt": PROMPT_IDS[i % len(PROMPT_IDS)], "temperature": 0,
                    "max_tokens": 16, "ignore_eos": True}
            return await client.post("/v1/completions", json=body)
        return await asyncio.gather(*(one(i) for i in range(n)))


def tokenizer_text(llama_dir, ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_dir)).decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("nproc", [2, 4])
def test_cluster_serves_identically_and_shuts_down(llama_dir, expected, nproc):
    cluster = Cluster(llama_dir, nproc)
    try:
        with httpx.Client(base_url=cluster.base, timeout=120) as client:
            assert len(cluster.ranks()) >= nproc
            texts = [complete(client, p).json()["choices"][0]["text"] for p in PROMPT_IDS]
            assert texts == [tokenizer_text(llama_dir, ids) for ids in expected]
            responses = asyncio.run(many_clients(cluster.base, 64))
            assert [r.status_code for r in responses] == [200] * 64
            assert all(r.json()["usage"]["completion_tokens"] == 16 for r in responses)
            for i, r in enumerate(responses):
                assert r.json()["choices"][0]["text"] == texts[i % len(PROMPT_IDS)]
            metrics = client.get("/metrics").text
            served = {line.split('instance="')[1].split('"')[0] for line in metrics.splitlines()
                      if line.startswith("kunserve_requests_running{")}
            assert served == {str(i) for i in range(nproc)}  # every rank reports
            assert f"kunserve_cluster_instances {nproc}" in metrics
    finally:
        code, survivors, out = cluster.stop()
    assert_clean_exit(code, survivors, out, nproc)


def test_chat_streaming_and_errors_while_a_stream_runs(llama_dir, expected):
    cluster = Cluster(llama_dir, 2)
    try:
        with httpx.Client(base_url=cluster.base, timeout=120) as client:
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
                    "max_tokens": 24, "ignore_eos": True}
            whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as stream:
                lines = stream.iter_lines()
                pieces = []
                for line in lines:
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    pieces.append(delta.get("content") or "")
                    if len(pieces) == 2:  # mid-stream: bad requests must not disturb it
                        bad = [
                            client.post("/v1/completions", content=b"{not json",
                                        headers={"content-type": "application/json"}),
                            client.post("/v1/completions", json={"model": MODEL}),
                            client.post("/v1/completions", json={"model": MODEL, "prompt": 5}),
                            client.post("/v1/completions", json={"model": "nope", "prompt": "hi"}),
                            complete(client, [1] * 120, max_tokens=40),
                            client.post("/v1/completions", content=b"x" * (2 << 20),
                                        headers={"content-type": "application/json"}),
                        ]
                        assert [r.status_code for r in bad] == [400, 400, 400, 404, 400, 413]
                        assert "maximum context length is 128" in bad[4].json()["error"]["message"]
                assert "".join(pieces) == whole
            assert complete(client, PROMPT_IDS[3]).json()["choices"][0]["text"] == tokenizer_text(llama_dir, expected[3])
    finally:
        code, survivors, out = cluster.stop()
    assert_clean_exit(code, survivors, out, 2)


def test_openai_client_against_cluster(llama_dir):
    openai = pytest.importorskip("openai")
    cluster = Cluster(llama_dir, 2)
    try:
        client = openai.OpenAI(base_url=f"{cluster.base}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == [MODEL]
        full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=10, temperature=0)
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=10, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == full.choices[0].message.content and full.usage.completion_tokens <= 10
    finally:
        code, survivors, out = cluster.stop()
    assert_clean_exit(code, survivors, out, 2)
