"""Live migration's mechanism between two in-process engines: both ranks run their part of each
cluster step in their own thread over an in-memory wire (objects are pickled as on gloo, so the
destination gets a copy of the ``Request``). The torchrun version is tests/test_llumnix_serve.py."""

from __future__ import annotations

import pickle
import queue
import threading
from collections import defaultdict
from types import SimpleNamespace

import pytest

import kunserve.runtime.migration as mig
from kunserve import LLM, SamplingParams
from kunserve.policy.migration import MigrationOrder
from kunserve.runtime.rank import RankState
from kunserve.runtime.migration import MigrationCommand, MigrationTask

ENGINE = dict(block_size=4, max_model_len=64)
PROMPTS = {"g": [1 + (7 * j) % 300 for j in range(10)], "s": [5 + (3 * j) % 300 for j in range(6)]}
PARAMS = {"g": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
          "s": SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)}


class Wire:
    """Point-to-point queues between the two ranks; each thread says which rank it is."""

    def __init__(self):
        self.queues = defaultdict(queue.Queue)
        self.me = threading.local()

    def send_object(self, obj, dst, group):
        self.queues[(self.me.rank, dst, "obj")].put(pickle.dumps(obj))

    def recv_object(self, src, group):
        return pickle.loads(self.queues[(src, self.me.rank, "obj")].get(timeout=10))

    def send(self, tensor, dst):
        self.queues[(self.me.rank, dst, "kv")].put(tensor.clone())

    def recv(self, tensor, src):
        tensor.copy_(self.queues[(src, self.me.rank, "kv")].get(timeout=10))


@pytest.fixture
def wire(monkeypatch):
    w = Wire()
    monkeypatch.setattr(mig, "send_object", w.send_object)
    monkeypatch.setattr(mig, "recv_object", w.recv_object)
    monkeypatch.setattr(mig, "dist", SimpleNamespace(send=w.send, recv=w.recv))
    return w


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, **ENGINE)
    outs = llm.generate([PROMPTS[k] for k in PROMPTS], [PARAMS[k] for k in PROMPTS], use_tqdm=False)
    return {k: o.outputs[0].token_ids for k, o in zip(PROMPTS, outs)}


def ranks(llama_dir, dst_blocks: int = 32) -> list[RankState]:
    src = LLM(str(llama_dir), num_kv_blocks=32, **ENGINE).engine
    dst = LLM(str(llama_dir), num_kv_blocks=dst_blocks, **ENGINE).engine
    for rid in PROMPTS:
        src.add_request(PROMPTS[rid], PARAMS[rid], rid)
    return [RankState(src, 0, 0), RankState(dst, 1, 1)]


def cluster_step(wire, states, tasks=()) -> tuple[list, dict]:
    """Both ranks' migration work (concurrently, as on real ranks), then both engine steps.
    Returns (the ranks' MigrationReports, request id -> token ids of outputs that finished)."""
    reports = [None, None]

    def run(state):
        wire.me.rank = state.rank
        reports[state.rank] = mig.run_migrations(state, MigrationCommand(tuple(tasks)), None)

    threads = [threading.Thread(target=run, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert all(r is not None for r in reports), "a rank hung in the handshake"
    finished = {}
    for s in states:
        if s.engine.has_unfinished_requests():
            finished |= {o.request_id: o.outputs[0].token_ids for o in s.engine.step() if o.finished}
    return reports, finished


def migrate(wire, states, rid: str, max_steps: int = 10):
    """Run one migration of ``rid`` from rank 0 to rank 1 to its end; returns (event, finished)."""
    order = MigrationOrder(rid, 0, 1, len(states[0].engine.block_manager.block_table(rid)))
    finished = {}
    for step in range(max_steps):
        reports, done = cluster_step(wire, states, [MigrationTask(order, 0, 1, start=step == 0)])
        finished |= done
        assert reports[1].events == ()  # only the source reports outcomes
        if reports[0].events:
            return reports[0].events[0], finished
    raise AssertionError(f"migration of {rid} did not end in {max_steps} steps")


def run_to_end(wire, states) -> dict:
    finished = {}
    while any(s.engine.has_unfinished_requests() for s in states):
        finished |= cluster_step(wire, states)[1]
    return finished


def test_multi_stage_migration_mid_decode_is_token_exact(llama_dir, reference, wire):
    states = ranks(llama_dir)
    src, dst = states[0].engine, states[1].engine
    for _ in range(5):  # prefill, then 4 decode steps: "g" holds 14 computed tokens = 4 blocks
        cluster_step(wire, states)
    report, _ = cluster_step(wire, states)
    assert {c.request_id: c.num_blocks for c in report[0].candidates} == {"g": 4, "s": 3}
    event, finished = migrate(wire, states, "g")
    # stage 1 copied the 3 full blocks while "g" kept decoding; the final stage the partial 4th
    assert (event.outcome, event.stages) == ("completed", 2)
    assert event.bytes_sent == 4 * src.memory.block_bytes
    assert "g" not in src.requests and not src.block_manager.block_table("g")
    assert [r.request_id for r in dst.scheduler.running] == ["g"] and "g" in dst.requests
    event, more = migrate(wire, states, "s")  # seeded: its generator state travels with it
    assert event.outcome == "completed"
    finished |= more | run_to_end(wire, states)
    assert finished == reference
    assert src.block_manager.num_free_blocks == 32 and dst.block_manager.num_free_blocks == 32
    assert states[0].migrations.outgoing == {} and states[1].migrations.incoming == set()


@pytest.mark.parametrize("how", ["abort", "preempt"])
def test_request_leaving_the_source_cancels_the_migration_on_both_sides(llama_dir, reference, wire, how):
    states = ranks(llama_dir)
    src, dst = states[0].engine, states[1].engine
    for _ in range(5):
        cluster_step(wire, states)
    order = MigrationOrder("g", 0, 1, 4)
    cluster_step(wire, states, [MigrationTask(order, 0, 1, start=True)])  # stage 1: 3 full blocks
    assert dst.block_manager.num_free_blocks == 28  # the destination holds blocks for "g"
    if how == "abort":
        src.abort_request("g")
    else:
        request = src.requests["g"]
        src.scheduler.running.remove(request)
        src.scheduler.preempt(request)
    reports, _ = cluster_step(wire, states, [MigrationTask(order, 0, 1, start=False)])
    (event,) = reports[0].events
    assert event.outcome == "aborted"
    assert ("aborted" if how == "abort" else "preempted") in event.reason
    assert dst.block_manager.num_free_blocks == 32 and not dst.requests
    assert states[1].migrations.incoming == set() and states[0].migrations.outgoing == {}
    finished = run_to_end(wire, states)
    assert finished == ({"s": reference["s"]} if how == "abort" else reference)  # nothing else disturbed


def test_destination_that_cannot_allocate_aborts_and_the_request_stays(llama_dir, reference, wire):
    states = ranks(llama_dir, dst_blocks=16)
    src, dst = states[0].engine, states[1].engine
    dst.add_request(list(range(1, 50)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "local")
    for _ in range(5):  # "local" holds 14 of the destination's 16 blocks; "g" needs 4
        cluster_step(wire, states)
    event, _ = migrate(wire, states, "g")
    assert event.outcome == "aborted" and "cannot allocate" in event.reason
    assert "g" in src.requests and dst.block_manager.block_table("g") == []
    finished = run_to_end(wire, states)
    assert {k: finished[k] for k in PROMPTS} == reference
