"""A torchrun entry point for tests/test_regroup.py: a 4-rank cluster whose merges and splits
come on a fixed schedule (the real drop controller and planner choose who merges; only *when*
is scripted), so the test can walk through 1+1 -> 2 (twice), 2+2 -> 4 and the split back.

    torchrun --nproc-per-node 4 tests/regroup_cluster.py MODEL_DIR OUT_JSON CHUNK_BYTES
"""

from __future__ import annotations

import json
import logging
import os
import sys

import attrs
import torch.distributed as dist

from kunserve.config import EngineConfig
from kunserve.policy.drop import Group
from kunserve.policy.overload import OverloadRules
from kunserve.runtime.cluster import ClusterDriver
from kunserve.runtime.rank import RankState, run_rank
from kunserve.runtime.drop_controller import DropController, weight_layout_of
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.regroup import SplitOrder
from kunserve.runtime.transport import init_cluster_groups
from kunserve.sampling_params import SamplingParams

MERGE_PAIRS_AT, MERGE_ALL_AT, SPLIT_AT = 3, 9, 16


class ReversedPairs:
    """The real planner, except that singles merging into a pair put the higher rank first, so
    rank 0 (the driver) serves as a non-leading stage (``REGROUP_REVERSED=1``)."""

    def __init__(self, planner):
        self.planner = planner

    def plan(self, groups, required, prefer=frozenset()):
        plan = self.planner.plan(groups, required, prefer=prefer)
        merged = tuple(Group(tuple(reversed(g.members)), g.slices) if all(len(s.members) == 1 for s in src) else g
                       for g, src in zip(plan.merged, plan.sources))
        return attrs.evolve(plan, merged=merged)


class ScriptedDrop(DropController):
    """Real planning and bookkeeping, at scripted steps instead of on overload."""

    step = 0

    def plan(self, snapshot):
        self.step += 1
        copy = self.layout.total_bytes
        if self.step == MERGE_PAIRS_AT:  # two copies' worth: singles merge pairwise, (0, 1) and (2, 3)
            return self.plan_for(snapshot, copy + 1)
        if self.step >= MERGE_ALL_AT and len(self.groups) == 2:  # once both pairs finished exchanging
            return self.plan_for(snapshot, copy)
        return []

    def plan_restore(self, snapshot):
        """The 4-group restores once the script says so: pull its weights back, then split."""
        four = [leader for leader, (order, _) in self.groups.items() if len(order.ranks) == 4]
        if self.step < SPLIT_AT or not four or snapshot.by_id(four[0]).exchanging:
            return []
        order = self.groups[four[0]][0]
        phase = "split" if four[0] in self.restoring else "pull"
        self.restoring.add(four[0])
        return [SplitOrder(order.ranks, order.slices, phase)]


def main() -> None:
    model_dir, out_path, chunk_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(name)s: %(message)s")
    dist.init_process_group("gloo")
    group = init_cluster_groups()
    engine = LLMEngine(EngineConfig(model=model_dir, num_kv_blocks=24, block_size=4, max_model_len=64,
                                    max_num_batched_tokens=32, memory="vmm"))
    if rank:
        run_rank(RankState(engine, rank, rank), group)
    else:
        drop = ScriptedDrop(weight_layout_of(engine.memory, engine.model_config.num_layers), engine.memory.block_bytes,
                            engine.memory.unified.kv_mapped_bytes, OverloadRules(0.5, 0.0), exchange_chunk_bytes=chunk_bytes,
                            pipeline_overlap=os.environ.get("REGROUP_OVERLAP", "1") == "1")
        if os.environ.get("REGROUP_REVERSED") == "1":
            drop.planner = ReversedPairs(drop.planner)
        driver = ClusterDriver(engine, 4, group, drop=drop)
        prompts = json.loads(os.environ["REGROUP_PROMPTS"])
        params = SamplingParams(temperature=0, max_tokens=int(os.environ["REGROUP_MAX_TOKENS"]), ignore_eos=True)
        late = len(prompts) // 2  # half arrive at once, half while the first merges' KV is moving
        for i, prompt in enumerate(prompts[:late]):
            driver.add_request(prompt, params, str(i))
        tokens, steps = {}, 0
        while driver.has_unfinished_requests() or steps <= MERGE_PAIRS_AT:
            if steps == MERGE_PAIRS_AT + 1:
                for i, prompt in enumerate(prompts[late:], start=late):
                    driver.add_request(prompt, params, str(i))
            for out in driver.step():
                if out.finished:
                    tokens[out.request_id] = out.outputs[0].token_ids
            steps += 1
        driver.shutdown()
        with open(out_path, "w") as f:
            json.dump({"tokens": tokens, "metrics": drop.metrics(), "steps": steps}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
