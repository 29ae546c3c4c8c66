"""`torchrun -m kunserve.serve` with 2 and 4 real ranks (gloo) and a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from kunserve import LLM, SamplingParams  # noqa: E402

MODEL = "tiny"
ENGINE_ARGS = dict(num_kv_blocks=48, block_size=8, max_model_len=128)
PROMPT_IDS = [[1 + (7 * i + 3 * j) % 300 for j in range(4 + 3 * i)] for i in range(8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A torchrun process tree serving on a loopback port; stopped with SIGTERM."""

    def __init__(self, model_dir, nproc: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "kunserve.serve", "--model", str(model_dir), "--served-model-name", MODEL,
            "--port", str(self.port), "--num-kv-blocks", "48", "--block-size", "8", "--max-model-len", "128",
            "--log-level", "INFO",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.nproc = nproc
        self._wait_healthy(timeout=180)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise AssertionError("cluster did not become healthy")

    def ranks(self) -> list:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, timeout: float = 60) -> tuple[int, list, str]:
        """SIGTERM torchrun as a user's Ctrl-C would; returns (exit code, survivors, output)."""
        children = self.ranks()
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
        survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        return self.proc.returncode, survivors, out.decode()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
