"""The cluster simulator (kunserve.sim): it drives the real policy objects, conserves requests and
tokens, fast-forwarding equals step-by-step simulation, and its CLI runs."""

from __future__ import annotations

import copy
import json
import random

import attrs
import numpy as np
import pytest

from kunserve.bench import traces
from kunserve.policy.cost_model import ChunkWork, CostModel
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.drop_controller import DropController
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import Scheduler
from kunserve.sampling_params import SamplingParams
from kunserve.sim import POLICIES, SimConfig, simulate
from kunserve.sim import regroup as sim_regroup
from kunserve.sim.fastforward import materialize, plan_stretch
from kunserve.sim.records import RequestLog, metrics_of
from kunserve.sim.timing import FittedCost, PipelineTiming, RooflineCost

from sim_workloads import SMALL, bursty

@pytest.fixture(scope="module")
def trace():
    return bursty()


@pytest.fixture(scope="module")
def runs(trace):
    """Every policy, exact and fast-forwarded, on the same bursty workload."""
    return {(policy, ff): simulate(SimConfig(policy=policy, fast_forward=ff, **SMALL), trace)
            for policy in POLICIES for ff in (False, True)}


# -- the sim drives the real policies ------------------------------------------------------------------
def test_a_burst_drops_and_the_sim_executes_exactly_the_drop_controllers_plan(trace, monkeypatch):
    planned, executed = [], []
    plan_for = DropController.plan_for
    merge = sim_regroup.merge

    def spy_plan(self, *args, **kwargs):
        orders = plan_for(self, *args, **kwargs)
        planned.extend(orders)
        return orders

    def spy_merge(order, *args, **kwargs):
        executed.append(order)
        group, pause, nbytes = merge(order, *args, **kwargs)
        # the group's KV pool is what the controller predicted from the planner's freed bytes
        drop = args[1]
        assert group.bm.num_blocks - group.bm.reserved <= drop.predicted_blocks[order.ranks[0]]
        return group, pause, nbytes

    monkeypatch.setattr(DropController, "plan_for", spy_plan)
    monkeypatch.setattr(sim_regroup, "merge", spy_merge)
    run = simulate(SimConfig(policy="kunserve", **SMALL), trace)
    assert planned, "the burst must overload memory and trigger a drop"
    assert [id(o) for o in executed] == [id(o) for o in planned]  # the very order objects, all of them
    assert run.regroups.drop.drops == len(executed) == run.regroups.merges
    assert all(o.micro_batcher is not None for o in executed)  # the controller's batcher rides on the order
    assert run.regroups.splits >= 1, "load falls after the burst: groups restore"
    kinds = [kind for _t, kind, _m in run.regroups.events]
    assert kinds.count("pull") >= run.regroups.splits  # every split came after its group pulled its weights
    assert run.regroups.metrics()["weight_bytes_pulled"] > 0
    assert run.unfinished == 0


def test_kunserve_cuts_tail_ttft_under_a_memory_burst(runs):
    vllm = metrics_of(runs["vllm", True].logs.values(), runs["vllm", True].end_time)
    kun = metrics_of(runs["kunserve", True].logs.values(), runs["kunserve", True].end_time)
    assert kun["ttft_s"]["p99"] < vllm["ttft_s"]["p99"] / 3
    assert runs["kunserve", True].preemptions < runs["vllm", True].preemptions


def test_baselines_use_their_mechanisms(runs):
    assert runs["swap", True].swapped_bytes > 0
    assert runs["llumnix", True].migrations.completed > 0
    assert runs["vllm-pp", True].bubble_s > 0 and runs["vllm", True].bubble_s == 0


# -- conservation and fast-forward == exact ----------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_finishes_once_with_the_tokens_it_asked_for(runs, trace, policy):
    for ff in (False, True):
        run = runs[policy, ff]
        # vllm-pp's and kunserve's groups step by request sets (the default): outputs applied a
        # step late, drains before merges, pulls and splits, exchange rounds paired with collects
        assert run.config.request_sets
        assert run.unfinished == 0
        assert len(run.logs) == len(trace)
        for i, log in enumerate(run.logs.values()):
            assert log.finishes == 1
            assert log.count == trace.output_lens[i] == len(log.times)
            assert log.arrival <= log.first <= log.last == log.finished_at
            assert log.times == sorted(log.times)


@pytest.mark.parametrize("policy", POLICIES)
def test_fast_forward_gives_the_same_per_request_times_as_step_by_step(runs, policy):
    exact, ff = runs[policy, False], runs[policy, True]
    if policy == "vllm-pp":  # request-set groups step exactly: a stretch steps every request every step
        assert ff.steps_ff == 0
    elif policy == "kunserve":  # its merged groups step exactly, its single instances fast-forward
        assert ff.steps_ff > 0
    else:
        assert ff.steps_ff > 2 * ff.steps_exact, "most steps should have been fast-forwarded"
    assert exact.steps_ff == 0
    assert exact.steps_exact == ff.steps_exact + ff.steps_ff
    for request_id, log in exact.logs.items():
        other = ff.logs[request_id]
        assert (log.times, log.preemptions, log.unit) == (other.times, other.preemptions, other.unit), request_id


@pytest.mark.parametrize("policy, blocks", [("vllm", 4000), ("kunserve", 1500)])
def test_fast_forward_equals_step_by_step_on_the_floored_h100_profile(policy, blocks, monkeypatch):
    """The shipped H100 profile (weight-read floor below 215 tokens, context term): decode steps on
    both sides of the knee, priced by the same function in stretches and in exact steps."""
    profile = "kunserve/data/profiles/h100-llama3-8b.json"
    widest = []
    decode_seconds = FittedCost.decode_seconds

    def spy(self, num_seqs, prefix_sum):
        widest.append(int(np.max(num_seqs)))
        return decode_seconds(self, num_seqs, prefix_sum)

    monkeypatch.setattr(FittedCost, "decode_seconds", spy)
    arrivals = traces.onoff_arrivals(600, 5.0, 600.0, 2.0, 0.5, seed=3)
    trace = traces.synthetic_trace(arrivals, 200, 150, 0.8, seed=3)
    exact, ff = (simulate(SimConfig(policy=policy, model="llama3-8b", profile=profile, instances=2,
                                    num_kv_blocks=blocks, min_hold_s=1.0, fast_forward=fast), trace)
                 for fast in (False, True))
    knee = exact.config.cost.cost_model.knee_tokens
    assert min(widest) < knee < max(widest), "decode steps on both sides of the floor's knee"
    # kunserve's merged groups step exactly (request sets); its single instances fast-forward
    assert ff.steps_ff > (ff.steps_exact if policy == "vllm" else 0) and exact.unfinished == ff.unfinished == 0
    for request_id, log in exact.logs.items():
        other = ff.logs[request_id]
        assert (log.times, log.preemptions, log.unit) == (other.times, other.preemptions, other.unit), request_id


def _decoding_scheduler(seed: int, blocks: int, waiting: int = 0, max_seqs: int = 64) -> Scheduler:
    """A scheduler whose running requests are all past their prefill (+ optional queue)."""
    rng = random.Random(seed)
    bm = BlockManager(blocks, 4)
    s = Scheduler(bm, max_seqs, 512)
    for i in range(12 + waiting):
        prompt, out = rng.randrange(1, 20), rng.randrange(1, 30)
        s.add(Request(f"q{i}", [0] * prompt, SamplingParams(max_tokens=out, ignore_eos=True), prompt + out,
                      arrival_time=0.0))
    for _ in range(2):  # prefill everything that fits, then one decode step
        out = s.schedule()
        s.update(out, {c.request.request_id: 0 for c in out.chunks if c.completes})
    return s


@pytest.mark.parametrize("seed, blocks, waiting, max_seqs", [
    (0, 200, 0, 64),  # plenty of blocks: runs until everyone finished
    (6, 60, 0, 64),  # blocks run out after 2 steps
    (2, 200, 30, 12),  # a queue held back by max_num_seqs: runs through the first finish only
    (8, 60, 5, 12),
])
def test_a_stretch_equals_stepping_the_real_scheduler(seed, blocks, waiting, max_seqs):
    s = _decoding_scheduler(seed, blocks, waiting, max_seqs)
    twin = copy.deepcopy(s)
    stretch = plan_stretch(s, s.block_manager, lambda alive, prefix: 0.01 + 0.0 * prefix, 0.0, 10_000, 1)
    assert stretch is not None and (stretch.n > 1 or waiting)
    free_after, finished = [], set()
    for _ in range(stretch.n):
        running_before = len(twin.running)
        out = twin.schedule()
        assert not out.preempted and len(out.chunks) == running_before and all(c.num_tokens == 1 for c in out.chunks)
        finished |= {r.request_id for r in twin.update(out, {c.request.request_id: 0 for c in out.chunks})}
        free_after.append(twin.block_manager.num_free_blocks)
    assert free_after == stretch.free_after.tolist()
    logs = {r.request_id: RequestLog(0.0, 0, 0, True) for r in s.running}
    got = {r.request_id for r in materialize(stretch, s, s.block_manager, logs)}
    assert got == finished
    assert [(r.request_id, r.num_tokens, r.num_computed_tokens) for r in s.running] == \
        [(r.request_id, r.num_tokens, r.num_computed_tokens) for r in twin.running]
    assert s.block_manager.num_free_blocks == twin.block_manager.num_free_blocks
    assert len(s.waiting) == len(twin.waiting) == max(0, 12 + waiting - max_seqs)
    assert {r: len(s.block_manager.block_table(r)) for r in s.block_manager.owners} == \
        {r: len(twin.block_manager.block_table(r)) for r in twin.block_manager.owners}


# -- timing ---------------------------------------------------------------------------------------------
def test_fitted_decode_form_is_the_cost_models_own_batch_cost():
    model = CostModel(a=2e-9, b=1e-9, f=2e-5, d=4e-3, lam=3e-3, g=9e-8)
    cost = FittedCost(model, scale=1.5)
    rng = random.Random(0)
    for _ in range(20):
        chunks = [ChunkWork(str(i), rng.randrange(0, 5000), 1) for i in range(rng.randrange(1, 300))]
        expect = 1.5 * model.batch_cost(chunks)
        got = cost.decode_seconds(np.array([len(chunks)]), np.array([sum(c.prefix for c in chunks)]))[0]
        assert got == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_fitted_decode_form_prices_the_weight_read_floor_on_both_sides_of_the_knee(scale):
    # the shipped H100 profile's floor and knee (3.5 ms below 215 tokens), plus a context term
    model = CostModel(a=2.5e-9, b=1.3e-9, f=1.77e-5, d=3.64e-3, lam=3.62e-3, g=4.3e-8, floor=3.51e-3,
                      knee_tokens=215, h=1.29e-6)
    cost = FittedCost(model, scale=scale)
    rng = random.Random(1)
    sizes = [1, 2, 37, 214, 215, 216, 252, 256, 600, 2048]
    batches = [[ChunkWork(str(i), rng.randrange(0, 8192), 1) for i in range(n)] for n in sizes]
    alive = np.array(sizes)  # [steps]
    prefix = np.array([sum(c.prefix for c in chunks) for chunks in batches])  # [steps]
    got = cost.decode_seconds(alive, prefix)  # [steps]: vectorised, as a fast-forwarded stretch prices
    for n, chunks, seconds in zip(sizes, batches, got):
        assert seconds == pytest.approx(scale * model.batch_cost(chunks), rel=1e-9), n
        assert cost.decode_seconds(n, sum(c.prefix for c in chunks)) == seconds  # scalars: the same bits
    # the h term never prices a decode-only batch (no chunk of > 1 token)
    assert np.array_equal(got, FittedCost(attrs.evolve(model, h=0.0), scale=scale).decode_seconds(alive, prefix))
    # above the knee the floor is gone: an affine probe of the floored model would under-price
    affine = FittedCost(attrs.evolve(model, floor=0.0), scale=scale)
    assert np.array_equal(got[alive >= 215], affine.decode_seconds(alive, prefix)[alive >= 215])
    assert (got[alive < 215] > affine.decode_seconds(alive, prefix)[alive < 215]).all()


def test_fitted_cost_rejects_a_model_whose_decode_form_it_cannot_price():
    class Bent(CostModel):
        def batch_cost(self, chunks):
            chunks = list(chunks)
            return super().batch_cost(chunks) + 1e-6 * len(chunks) ** 2

    with pytest.raises(ValueError, match="one-token form"):
        FittedCost(Bent(a=2e-9, b=1e-9, f=2e-5, d=4e-3, lam=3e-3))


def test_one_micro_batch_through_a_pipeline_costs_the_forward_plus_the_hops():
    from kunserve.sim.hardware import GPUS, LINKS
    from kunserve.sim.model import resolve

    cost = RooflineCost(resolve("qwen2.5-14b"), GPUS["h100-80gb"])
    timing = PipelineTiming(cost, (0.5, 0.5), LINKS["rdma-200"], 10240, 1, 1e-3, 0.0)
    chunks = [ChunkWork(str(i), 100 * i, 1) for i in range(64)]
    step = timing.step_seconds([chunks], len(chunks))
    decode = timing.decode_seconds(np.array([64]), np.array([sum(c.prefix for c in chunks)]))[0]
    assert step.seconds == pytest.approx(decode, rel=1e-9)
    assert step.bubble == pytest.approx(step.busy + 2 * timing.hop_seconds(64), rel=1e-9)  # 2 stages, 1 micro-batch
    # two equal micro-batches overlap: stage 2 runs the first while stage 1 runs the second
    halves = timing.step_seconds([chunks[:32], chunks[32:]], len(chunks))
    assert halves.seconds < step.seconds + cost.batch_seconds(chunks[:1])


def test_memory_model_of_the_papers_two_models():
    c14 = SimConfig(model="qwen2.5-14b", gpu="h100-80gb")
    assert c14.shape.weight_bytes == pytest.approx(29.5e9, rel=0.01)
    assert c14.shape.kv_bytes_per_token == 48 * 2 * 8 * 128 * 2
    assert 200_000 < c14.instance_blocks * c14.block_size < 260_000  # ~45 GB of KV
    c72 = SimConfig(model="qwen2.5-72b", gpu="h100-80gb", tp=4)
    assert c72.shape.weight_bytes == pytest.approx(145.4e9, rel=0.01) and c72.instance_blocks > 0
    with pytest.raises(ValueError, match="does not fit"):
        _ = SimConfig(model="qwen2.5-72b", gpu="h100-80gb", tp=1).instance_blocks
    with pytest.raises(ValueError, match="policy"):
        SimConfig(policy="nope")
    with pytest.raises(ValueError, match="lockstep"):
        SimConfig(lockstep=True)


# -- sanity ---------------------------------------------------------------------------------------------
def test_more_instances_lower_ttft_under_the_same_load():
    trace = traces.synthetic_trace(traces.gamma_arrivals(400, 60.0, 1.0, seed=5), 600, 100, 0.5, seed=5)
    ttft = {}
    for n in (2, 4, 8):
        run = simulate(SimConfig(policy="vllm", instances=n, num_kv_blocks=400), trace)
        ttft[n] = metrics_of(run.logs.values(), run.end_time)["ttft_s"]
    assert ttft[2]["mean"] > ttft[4]["mean"] > ttft[8]["mean"]
    assert ttft[2]["p99"] > ttft[4]["p99"] > ttft[8]["p99"]


def test_lockstep_mode_steps_units_together():
    trace = bursty(num=60)
    run = simulate(SimConfig(policy="vllm", fast_forward=False, lockstep=True, **SMALL), trace)
    assert run.unfinished == 0
    # lockstep: all units' token times fall on the same cluster step boundaries
    times = {t for log in run.logs.values() for t in log.times}
    per_unit = {}
    for log in run.logs.values():
        per_unit.setdefault(log.unit, set()).update(log.times)
    assert all(ts <= times for ts in per_unit.values()) and len(per_unit) > 1


def test_cli_writes_a_labelled_summary(tmp_path):
    from kunserve.sim.__main__ import main

    out = tmp_path / "sim"
    code = main(["--compare", "--policies", "vllm", "kunserve", "--instances", "2", "--num-kv-blocks", "120",
                 "--synthetic", "onoff", "--num-prompts", "40", "--input-len", "300", "--output-len", "60",
                 "--request-rate", "4", "--burst-rate", "200", "--min-hold-s", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["simulation"] is True and "SIMULATION" in (out / "table.txt").read_text()
    assert set(report["summary"]) == {"vllm", "kunserve"}
    assert report["summary"]["vllm"]["completed"] == 40


def test_qwen72b_on_tp4_instances_drops_under_a_burst():
    """The paper's large model: TP4 instances (all-reduces in the step, 4 NICs per instance)."""
    trace = bursty(num=150, input_len=600, output_len=200)
    run = simulate(SimConfig(policy="kunserve", model="qwen2.5-72b", tp=4, instances=2, num_kv_blocks=150,
                             min_hold_s=1.0), trace)
    assert run.unfinished == 0 and run.regroups.merges >= 1
    one_gpu = RooflineCost(run.config.shape, run.config.gpu_spec, 1)
    tp4 = RooflineCost(run.config.shape, run.config.gpu_spec, 4)
    chunks = [ChunkWork(str(i), 1000, 1) for i in range(32)]
    assert one_gpu.batch_seconds(chunks) / 4 < tp4.batch_seconds(chunks) < one_gpu.batch_seconds(chunks) / 3


def test_bubble_ablation_lookahead_shrinks_the_flow_shops_prefill_bubble(tmp_path):
    """Issue 7's ablation (experiments.bubble_ablation): one 2-stage vllm-pp pipeline, a burst of
    long prompts; in the lockstep flow shop lookahead's equal-cost micro-batches (MIN 256 on the
    roofline) leave far less fill-and-drain than the 4,096-token budget's."""
    from kunserve.sim.experiments import BurstWorkload, bubble_ablation, main

    workload = BurstWorkload(base_rate=0.1, burst_requests=30, on_s=1.0, period_s=10.0, duration_s=10.0,
                             input_len=2048, output_len=16)
    rows = {(r["pipeline_model"], r["micro_batching"]): r for r in bubble_ablation(workload)}
    assert len(rows) == 6 and all(r["unfinished"] == 0 for r in rows.values())
    budget, lookahead = rows["lockstep", "token-budget"], rows["lockstep", "lookahead"]
    assert lookahead["prefill_bubble_fraction"] < budget["prefill_bubble_fraction"] / 2
    assert budget["bubble_fraction"] == budget["pipeline_bubble_fraction"]  # vllm-pp: every unit is a pipeline
    # the overlapped model prices a step at its bottleneck stage: balanced micro-batches leave no bubble
    assert rows["analytic", "lookahead"]["prefill_bubble_fraction"] < 0.01
    out = tmp_path / "bubble.json"
    assert main(["bubble", "--burst-requests", "10", "--duration-s", "5", "--period-s", "5", "--on-s", "1",
                 "--output-len", "8", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 6


def test_validation_twin_overlaps_pipelines_as_the_real_run_did():
    import argparse

    from kunserve.sim.validate import runtime_overlaps

    assert runtime_overlaps(argparse.Namespace(serve_arg=[]))  # the serve default
    assert not runtime_overlaps(argparse.Namespace(serve_arg=["--block-size", "4", "--pipeline-overlap", "off"]))
    assert not runtime_overlaps(argparse.Namespace(serve_arg=["--pipeline-overlap=off"]))
    assert runtime_overlaps(argparse.Namespace(serve_arg=["--pipeline-overlap", "on"]))


def test_predict_mode_twins_a_multi_gpu_run_without_calibration(tmp_path):
    """``python -m kunserve.sim.validate --predict``: a run with one instance per GPU, rebuilt from
    its compare.json arguments, on the named GPU and link, with the runtime's KV-exchange rounds."""
    import json

    from kunserve.bench.compare import parse_args
    from kunserve.runtime.regroup import DEFAULT_EXCHANGE_CHUNK_BYTES
    from kunserve.sim.hardware import LINKS
    from kunserve.sim.validate import Calibration, main, sim_config

    args = parse_args(["--policies", "vllm", "kunserve", "--ranks", "2", "--num-kv-blocks", "256",
                       "--block-size", "16", "--max-model-len", "4096", "--max-num-batched-tokens", "2048",
                       "--synthetic", "onoff", "--request-rate", "2", "--burst-rate", "150", "--off-s", "2",
                       "--on-s", "0.3", "--num-prompts", "40", "--input-len", "512", "--output-len", "32",
                       "--seed", "1"])
    run = tmp_path / "run"
    run.mkdir()
    fake = [{"send": 0.0, "ttft": 1.0, "tpot": 0.03, "ok": True}] * 40  # the prediction ignores these
    (run / "compare.json").write_text(json.dumps({"args": vars(args), "requests": {"vllm": fake, "kunserve": fake}}))
    config = sim_config(args, "kunserve", None, Calibration(), "qwen2.5-14b", ("h200-141gb", "nvlink"))
    assert (config.gpu, config.link, config.weight_granularity) == ("h200-141gb", "nvlink", 2 << 20)
    assert config.exchange_chunk_s * LINKS["nvlink"].bandwidth == pytest.approx(DEFAULT_EXCHANGE_CHUNK_BYTES)
    out = tmp_path / "prediction.json"
    assert main(["--predict", str(run), "--model", "qwen2.5-14b", "--gpu", "h200-141gb", "--out", str(out)]) == 0
    report = json.loads(out.read_text())[str(run)]
    for policy in ("vllm", "kunserve"):
        sim = report[policy]["sim"]
        assert 0 < sim["ttft_p50"] <= sim["ttft_p99"] and 0 < sim["tpot_p50"]
    with pytest.raises(SystemExit):
        main(["--validate", str(run)])  # neither a calibration nor a prediction asked for
