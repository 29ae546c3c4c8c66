"""Drop planner time for N = 10^2, 10^4, 10^5 instances (target < 100 ms at 10^5)."""

from __future__ import annotations

import pytest

from kunserve.policy.drop import GreedyDropPlanner, Group, WeightLayout

# Qwen-2.5-14B-like: 48 layers of ~0.6 GB, embedding and head ~1.6 GB each (bf16)
LAYOUT = WeightLayout(layer_bytes=(616_000_000,) * 48, embed_bytes=1_557_000_000, head_bytes=1_557_000_000)


@pytest.mark.parametrize("num_instances", [100, 10_000, 100_000])
def test_plan_time(benchmark, num_instances):
    groups = [Group.single(i, LAYOUT.num_layers) for i in range(num_instances)]
    planner = GreedyDropPlanner(LAYOUT, max_group_size=8)
    # Demand that needs every instance merged into groups of 8: the worst case for the heap.
    required = LAYOUT.total_bytes * num_instances
    plan = benchmark.pedantic(planner.plan, args=(groups, required), rounds=7, warmup_rounds=2)
    assert max(g.size for g in plan.groups) == 8 and len(plan.groups) == -(-num_instances // 8)
    assert plan.num_merges == num_instances - len(plan.groups)


@pytest.mark.parametrize("num_instances", [100, 10_000, 100_000])
def test_plan_time_typical_burst(benchmark, num_instances):
    """A burst whose queued demand needs a tenth of the instances' weight copies back."""
    groups = [Group.single(i, LAYOUT.num_layers) for i in range(num_instances)]
    planner = GreedyDropPlanner(LAYOUT, max_group_size=8)
    required = LAYOUT.total_bytes * (num_instances // 10)
    plan = benchmark.pedantic(planner.plan, args=(groups, required), rounds=7, warmup_rounds=2)
    assert plan.satisfied and plan.num_merges == num_instances // 10
