"""The simulator's pipeline groups stepped by request sets (``kunserve.sim.request_sets``), as the
runtime's overlapped leader steps them (``LLMEngine._overlapped_step``): hand-computed flow
shops, bubbles of unequal steps, drains before regroups, lockstep cluster steps, and the
analytic model it replaced as the default."""

from __future__ import annotations

import numpy as np
import pytest

from kunserve.bench import traces
from kunserve.policy.cost_model import ChunkWork
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import Scheduler
from kunserve.sampling_params import SamplingParams
from kunserve.sim import SimConfig, simulate
from kunserve.sim import regroup as sim_regroup
from kunserve.sim.records import RequestLog
from kunserve.sim.timing import PipelineTiming

from sim_workloads import SMALL, bursty


@pytest.fixture(scope="module")
def trace():
    return bursty()


# -- overlapped pipelines stepped by request sets (the runtime's LLMEngine._overlapped_step) -----------
class LinearCost:
    """A fake StepCost: a forward costs ``fixed`` + ``per_token`` x tokens, whatever the context,
    so stage times (and the flow shop around them) can be computed by hand."""

    def __init__(self, fixed: float, per_token: float = 0.0):
        self.fixed, self.per_token = fixed, per_token

    def batch_seconds(self, chunks) -> float:
        return self.fixed + self.per_token * sum(c.num_tokens for c in chunks)

    def decode_seconds(self, num_seqs, prefix_sum):
        return self.fixed + self.per_token * num_seqs + 0.0 * np.asarray(prefix_sum, dtype=float)


def _sets_unit(cost, requests, hop_latency_s=1e-4, host_s=0.0, budget=8192):
    """A 2-stage group stepped by request sets around a real Scheduler; ``requests``:
    (prompt tokens, output tokens) each, queued at time 0 in order."""
    from kunserve.sim.hardware import Link
    from kunserve.sim.instance import UnitEnv
    from kunserve.sim.request_sets import RequestSetsUnit

    timing = PipelineTiming(cost, (0.5, 0.5), Link("test", 1e15, hop_latency_s), 0, 1, host_s, 0.0,
                            overlap=True, request_sets=True)
    scheduler = Scheduler(BlockManager(4000, 16), 256, budget)
    logs = {}
    for i, (prompt, output) in enumerate(requests):
        scheduler.add(Request(f"q{i}", [0] * prompt, SamplingParams(max_tokens=output, ignore_eos=True),
                              prompt + output, arrival_time=0.0))
        logs[f"q{i}"] = RequestLog(0.0, prompt, output, True)
    unit = RequestSetsUnit(0, (0, 1), ((0, 1), (1, 2)), scheduler, timing, UnitEnv(logs, fast_forward=False))
    assert unit.steps_by_sets
    return unit, logs


def _step_alone(unit) -> list[float]:
    """Iterate a lone unit until it idles; returns its iteration end times."""
    ends, end = [], unit.begin(0.0)
    while end is not None:
        unit.finish(end)
        ends.append(end)
        end = unit.begin(end)
    assert not unit.in_flight and not unit.scheduler.has_unfinished()
    return ends


@pytest.mark.parametrize("hop_latency_s, host_s", [(1e-4, 1e-3), (3e-3, 1e-3), (2e-3, 0.0)])
def test_a_two_stage_groups_decode_iterations_are_the_hand_computed_flow_shop(hop_latency_s, host_s):
    """One micro-batch per step, equal sets, stage time s = forward / 2, host h, hop L (also the
    result's way back). Iteration k launches set k mod 2 at t_k: stage 0 runs [t_k + h, t_k + h + s]
    and the iteration ends when that is done and step k-1's result is back, at t_{k-1} + h + 2 s + 2 L
    (one round trip). So a set's cycle (two iterations, a token for each of its requests) is
    C = max(2 (h + s), h + 2 s + 2 L); compute-bound, every iteration takes h + s."""
    forward = 10e-3
    s = forward / 2
    cycle = max(2 * (host_s + s), host_s + 2 * s + 2 * hop_latency_s)
    unit, logs = _sets_unit(LinearCost(forward), [(1, 40)] * 4, hop_latency_s, host_s)
    ends = np.array(_step_alone(unit))
    steady = ends[6:70]  # sets are rebalanced to 2 + 2 after the first iterations
    assert steady[2:] - steady[:-2] == pytest.approx(np.full(len(steady) - 2, cycle), rel=1e-9, abs=1e-12)
    if 2 * (host_s + s) >= cycle:
        assert np.diff(steady) == pytest.approx(np.full(len(steady) - 1, host_s + s), rel=1e-9, abs=1e-12)
    for log in logs.values():
        assert log.count == 40 and log.finishes == 1
        gaps = np.diff(log.times[3:-3])
        assert gaps == pytest.approx(np.full(len(gaps), cycle), rel=1e-9, abs=1e-12)
    # busy: every iteration that produced tokens computed one forward; 2 members held throughout
    assert unit.busy_s == pytest.approx(len({t for log in logs.values() for t in log.times}) * forward, rel=1e-9)
    assert unit.stage_s == pytest.approx(2 * ends[-1], rel=1e-9)


def test_imbalanced_consecutive_steps_leave_a_bubble_balanced_ones_almost_none():
    """Three decoding requests make sets of 2 and 1 (cost per token only): the light set's step
    leaves the stage the heavy one just left idle, and the heavy set's next step waits for its
    result, a quarter of every cycle in steady state. Two long prompts keep both stages busy."""
    per_token = LinearCost(0.0, 1e-3)
    imbalanced, _ = _sets_unit(per_token, [(1, 40)] * 3, budget=512)
    cost = LinearCost(1e-3, 2e-5)
    balanced, _ = _sets_unit(cost, [(512 * 20, 1)] * 2, budget=512)
    for unit in (imbalanced, balanced):
        _step_alone(unit)
    assert imbalanced.bubble_s / imbalanced.stage_s > 0.25
    assert balanced.bubble_s / balanced.stage_s < 0.1
    assert balanced.busy_s == pytest.approx(2 * 20 * cost.batch_seconds([ChunkWork("x", 0, 512)]), rel=1e-9)


def test_a_long_prompt_rides_in_every_sets_step():
    """One long prompt and one short request (the burst under scarce KV after a merge): the
    prompt's chunks ride in both sets' steps (``Scheduler._continue_prefills``), so every
    iteration while it prefills carries a full 512-token chunk, its prefill takes 20 iterations,
    not 40 alternating with empty steps, and the stages are idle only for the hops."""
    cost = LinearCost(1e-3, 2e-5)
    unit, logs = _sets_unit(cost, [(512 * 20, 1), (1, 20)], budget=512)
    launched = []
    begin = unit.begin

    def spy(now):
        end = begin(now)
        if unit.output is not None:
            launched.append([(c.request.request_id, c.start, c.num_tokens) for c in unit.output.chunks])
        return end

    unit.begin = spy
    _step_alone(unit)
    assert launched[:20] == [[("q0", 512 * i, 512)] for i in range(20)]  # sets 0, 1, 0, ... in turn
    assert logs["q0"].count == 1 and logs["q1"].count == 20
    stage_s = cost.batch_seconds([ChunkWork("x", 0, 512)]) / 2
    # 20 chunks back to back on stage 0, the last one's trip through stage 1, and the hops; held
    # to its own set the prompt would take ~40 stage times (a full step, then an empty one)
    assert 21 * stage_s < logs["q0"].times[0] < 1.1 * 21 * stage_s


def test_regroups_and_pulls_wait_for_the_steps_in_flight(trace, monkeypatch):
    """kunserve under request sets: a merge, a restore's pull and a split each find their units
    drained (LLMEngine.drain), and no collected output is applied to a unit after it was replaced."""
    from kunserve.sim.request_sets import RequestSetsUnit as Unit

    replaced, drains_with_work = set(), []
    merge, split, start_pull = sim_regroup.merge, sim_regroup.split, sim_regroup.start_pull
    apply_collected, drain_iteration = Unit._apply_collected, Unit._drain_iteration

    def spy_merge(order, sources, *args, **kwargs):
        assert all(not u.in_flight for u in sources)
        replaced.update(id(u) for u in sources)
        return merge(order, sources, *args, **kwargs)

    def spy_split(order, unit, *args, **kwargs):
        assert not unit.in_flight
        replaced.add(id(unit))
        return split(order, unit, *args, **kwargs)

    def spy_pull(order, unit, *args, **kwargs):
        assert not unit.in_flight
        return start_pull(order, unit, *args, **kwargs)

    def spy_apply(self, output, now):
        assert id(self) not in replaced, "an output applied to a unit after its regroup"
        return apply_collected(self, output, now)

    def spy_drain(self, now):
        if self.in_flight and (self.pending is not None or self.drain_actions):
            drains_with_work.append(len(self.in_flight))
        return drain_iteration(self, now)

    monkeypatch.setattr(sim_regroup, "merge", spy_merge)
    monkeypatch.setattr(sim_regroup, "split", spy_split)
    monkeypatch.setattr(sim_regroup, "start_pull", spy_pull)
    monkeypatch.setattr(Unit, "_apply_collected", spy_apply)
    monkeypatch.setattr(Unit, "_drain_iteration", spy_drain)
    run = simulate(SimConfig(policy="kunserve", **SMALL), trace)
    assert run.regroups.merges >= 1 and run.regroups.splits >= 1 and run.regroups.pulls
    assert drains_with_work, "some regroup found its group with steps in flight and drained it"
    assert run.unfinished == 0


@pytest.mark.parametrize("policy", ["vllm-pp", "kunserve"])
def test_lockstep_steps_one_engine_iteration_of_every_unit_per_cluster_step(policy):
    """The validation twin's mode: a cluster step is one iteration (launch + collect) of every
    unit, so every token lands on a cluster step boundary; every request finishes once."""
    trace = bursty(num=60)
    run = simulate(SimConfig(policy=policy, fast_forward=False, lockstep=True, **SMALL), trace)
    assert run.unfinished == 0
    per_unit = {}
    for i, log in enumerate(run.logs.values()):
        assert log.finishes == 1 and log.count == trace.output_lens[i]
        per_unit.setdefault(log.unit, set()).update(log.times)
    boundaries = set().union(*per_unit.values())
    assert len(per_unit) > 1 and all(ts <= boundaries for ts in per_unit.values())
    assert run.bubble_s > 0


def test_the_analytic_pipeline_model_reproduces_the_numbers_from_before_request_sets():
    """pipeline_model="analytic" is the steady-state model as it was (numbers of the code before
    request sets existed, same trace and config): the fast choice for paper-scale runs."""
    arrivals = traces.onoff_arrivals(120, 5.0, 200.0, 2.0, 0.5, seed=3)
    trace = traces.synthetic_trace(arrivals, 400, 150, 0.8, seed=3)
    expected = {"vllm-pp": (21.081337310137865, 9.504957332231347, 135.9333617105448, 1081.0174014993033),
                "kunserve": (7.881710566950987, 3.4633099461803596, 74.50223411477305, 319.7442621708363)}
    for policy, numbers in expected.items():
        run = simulate(SimConfig(policy=policy, pipeline_model="analytic", **SMALL), trace)
        got = (run.end_time, run.bubble_s, run.stage_s, sum(log.first for log in run.logs.values()))
        assert got == pytest.approx(numbers, rel=1e-12), policy  # (bit-identical today)
        assert run.steps_ff > run.steps_exact  # analytic groups still fast-forward


def test_the_pipeline_model_is_a_validated_config_field_and_a_cli_option():
    from kunserve.sim.__main__ import config_for, parse_args

    assert SimConfig().pipeline_model == "sets" and SimConfig().request_sets
    assert not SimConfig(pipeline_overlap=False).request_sets  # lockstep: no sets to step
    with pytest.raises(ValueError, match="pipeline_model"):
        SimConfig(pipeline_model="exact")
    args = parse_args(["--policy", "vllm-pp", "--pipeline-model", "analytic"])
    assert config_for(args, "vllm-pp").pipeline_model == "analytic"
    assert config_for(parse_args([]), "vllm-pp").pipeline_model == "sets"
    # a set's step has one instance's token budget; the analytic group-wide step has g x
    assert SimConfig().limits(2) == (512, 8192)
    assert SimConfig(pipeline_model="analytic").limits(2) == (512, 16384)
    assert SimConfig().limits(1) == (256, 8192)
