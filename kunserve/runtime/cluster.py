"""Data-parallel cluster: one instance per rank, stepped in lockstep by rank 0.

Rank 0 runs the ``ClusterDriver``: it owns the global view (one ``InstanceSnapshot`` per
instance), dispatches each new request to an instance with the dispatch policy, and advances
the cluster one step at a time: send every worker a ``StepCommand`` (new requests, aborts),
step its own instance, then collect every worker's ``StepReport`` (outputs + snapshot).
Workers (ranks >= 1) run ``rank.run_rank``: receive a command, apply it, step, report. Under the
kunserve policy the ``DropController`` turns overload into merge orders: the named ranks form
a pipeline group in the next step (``regroup.merge_into_group``) and serve as one instance.

The driver has the same surface as ``LLMEngine`` (``add_request``, ``abort_request``, ``step``,
``has_unfinished_requests``), so the async front end drives one engine or a cluster alike.
Lockstep keeps every instance's view one step fresh; an overlapped pipeline stage answers its
command before computing, so rank 0 computes its own stage meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import attrs

from kunserve.outputs import RequestOutput
from kunserve.policy.dispatch import LoadBalancingDispatcher
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot
from kunserve.runtime.drop_controller import DropController
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.migration import MigrationCoordinator
from kunserve.runtime.pipeline_step import StepTiming
from kunserve.runtime.rank import (NewRequest, RankState, StepCommand, StepReport, drain_rank, handle_command,
                                   run_deferred_step)
from kunserve.runtime.regroup import MergeOrder, SplitOrder
from kunserve.runtime.transport import PendingSends, recv_object
from kunserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@attrs.define
class PipelineTime:
    """Pipeline bubbles, from the leaders' step timings: per rank, the wall seconds of its
    groups' steps and the seconds it computed; the rest it sat idle. With ``step_log`` (serve's
    ``--pipeline-step-log``) every timing is also appended to that file as one JSON line, to see
    which steps the idle time sits in (a step's wall runs from the previous result, so with steps
    overlapped part of a step's compute lands in its neighbour's wall; sums over a run agree)."""

    wall: dict[int, float] = attrs.Factory(dict)
    busy: dict[int, float] = attrs.Factory(dict)
    steps: int = 0
    step_log: Path | None = None

    def record(self, timing: StepTiming) -> None:
        self.steps += 1
        for rank, seconds in timing.busy.items():
            self.wall[rank] = self.wall.get(rank, 0.0) + timing.wall
            self.busy[rank] = self.busy.get(rank, 0.0) + seconds
        if self.step_log is not None:
            line = {"time": time.time(), "leader": timing.leader, "wall_s": timing.wall,
                    "busy_s": {str(r): s for r, s in timing.busy.items()}, "tokens": timing.tokens,
                    "micro_batches": list(timing.micro_batches)}
            with open(self.step_log, "a") as f:
                f.write(json.dumps(line) + "\n")

    def metrics(self) -> dict:
        if not self.steps:
            return {}
        idle = {str(r): max(0.0, 1 - self.busy[r] / self.wall[r]) for r in sorted(self.wall) if self.wall[r] > 0}
        total_wall = sum(self.wall.values())
        return {"pipeline_steps_total": self.steps, "pipeline_idle_fraction": idle,
                "pipeline_bubble_fraction": max(0.0, 1 - sum(self.busy.values()) / total_wall) if total_wall else 0.0}


class ClusterDriver:
    """Rank 0's view and control of every instance.

    ``migration`` (set by serve for ``--policy llumnix``) plans and tracks live migrations.

    Invariants: ``owner`` maps every unfinished request id to its instance; a request id leaves
    ``owner`` exactly when its finished output is returned from ``step``.
    """

    migration: MigrationCoordinator | None = None

    def __init__(self, local_engine: LLMEngine, world_size: int = 1, group=None, pipeline_size: int = 1,
                 drop: DropController | None = None, step_log: Path | None = None):
        if world_size % pipeline_size:
            raise ValueError(f"world size {world_size} is not a multiple of pipeline size {pipeline_size}")
        self.local = local_engine
        self.world_size = world_size
        self.group = group
        # Instance i is the group led by rank i * pipeline_size; rank 0 leads instance 0.
        self.instance_rank = {i: i * pipeline_size for i in range(world_size // pipeline_size)}
        self.dispatcher = LoadBalancingDispatcher()
        self.snapshots = {i: local_engine.snapshot(i) for i in self.instance_rank}
        self.owner: dict[str, int] = {}
        self._new: dict[int, list[NewRequest]] = {i: [] for i in self.instance_rank if i}
        self._aborts: dict[int, list[str]] = {i: [] for i in self.instance_rank if i}
        self.failed_steps = 0
        self.pipeline_time = PipelineTime(step_log=step_log)
        self.local_state = RankState(local_engine, 0, 0, None, always_step=pipeline_size > 1)
        self.drop = drop
        self._merges: dict[int, MergeOrder | SplitOrder] = {}  # rank -> regrouping it runs next step

    # The engine-like surface --------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.local.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.local.max_model_len

    @property
    def model_config(self):
        return self.local.model_config

    def tokenize(self, prompt):
        return self.local.tokenize(prompt)

    def validate_prompt(self, token_ids):
        self.local.validate_prompt(token_ids)

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(tuple(self.snapshots[i] for i in sorted(self.snapshots)))

    def add_request(self, prompt, params=None, request_id=None, arrival_time=None) -> str:
        params = params or SamplingParams()
        if request_id is None or request_id in self.owner:
            raise ValueError(f"request id {request_id!r} is missing or already in use")
        token_ids = self.local.tokenize(prompt)
        self.local.validate_prompt(token_ids)
        block_size = self.local.block_manager.block_size
        instance = self.dispatcher.choose(self.snapshot(), -(-len(token_ids) // block_size))
        if instance == 0:
            self.local.add_request(token_ids, params, request_id, arrival_time)
        else:
            self._new[instance].append(NewRequest(request_id, token_ids, params, arrival_time))
        self.owner[request_id] = instance
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        instance = self.owner.get(request_id)
        if instance == 0:
            del self.owner[request_id]
            return self.local.abort_request(request_id)
        if instance is not None:
            self._aborts[instance].append(request_id)  # its output arrives with the next report
        return None

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner)

    def has_background_work(self) -> bool:
        """Steps are needed without requests: a regrouping is ordered, or a drop group exists
        (it moves KV or weights in rounds, and is restored once the hold time has passed)."""
        return bool(self._merges) or (self.drop is not None and bool(self.drop.groups))

    def extra_metrics(self) -> dict:
        """Cluster-level counters for /metrics (the drop mechanism adds drops and restores)."""
        extra = {"cluster_instances": len(self.snapshots), "failed_steps_total": self.failed_steps}
        extra |= self.migration.metrics() if self.migration else {}
        extra |= self.pipeline_time.metrics()
        return extra | (self.drop.metrics() if self.drop else {})

    def step(self) -> list[RequestOutput]:
        merges, self._merges = self._merges, {}
        commands = self._take_commands(merges)
        local = _regroup_command(StepCommand(), merges.get(0))
        if self.migration is not None:  # llumnix: this step's migration tasks ride on the commands
            commands, local = self.migration.attach(commands, local, self.instance_rank)
        # Sent without waiting: an overlapped pipeline stage takes its command only after it
        # finished the previous step, and rank 0 computes its own stage meanwhile.
        sent = PendingSends()
        for rank, command in commands.items():
            sent.send_object(command, rank, self.group)
        # Rank 0 as a non-leading stage runs the step it deferred in the previous cluster step
        # only now, after the commands went out: that step's exchange round pairs with its
        # leader's, which the leader runs in this cluster step (StageWorker's round pairing), and
        # it overlaps the leader's next stage-0 step.
        run_deferred_step(self.local_state)
        reports = [handle_command(self.local_state, local, self.group)]
        reports += [recv_object(rank, self.group) for rank in commands]
        sent.wait()  # every rank answered, so it has its command
        outputs = [o for report in reports for o in self._absorb(report)]
        if self.migration is not None:  # before finished requests leave owner: it re-points migrated ones
            self.migration.after_step(self, reports)
        if self.drop is not None:
            self.drop.record_exchange([r.exchange for r in reports if r.exchange is not None])
            self.drop.record_split(sum(r.restore_bytes for r in reports), 0.0)
        for timing in (t for r in reports for t in r.pipeline):
            self.pipeline_time.record(timing)
        if merges:
            self._apply_merges({o for o in merges.values() if isinstance(o, MergeOrder)}, reports)
            self._apply_splits({o for o in merges.values() if isinstance(o, SplitOrder) and o.phase == "split"}, reports)
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        if self.drop is not None:
            orders = self.drop.plan(self.snapshot()) + self.drop.plan_restore(self.snapshot())
            self._merges = {rank: order for order in orders for rank in order.ranks}
        return outputs

    def _apply_splits(self, orders: set[SplitOrder], reports: list[StepReport]) -> None:
        """Every member of a split group serves alone again; requests follow the assignment."""
        for order in orders:
            for member in order.ranks:
                self.instance_rank[member] = member
                self._new.setdefault(member, [])
                self._aborts.setdefault(member, [])
            self.drop.restored(order)
        for report in reports:
            if report.assignment is not None:
                self.owner.update({rid: rank for rid, rank in report.assignment.items() if rid in self.owner})
            if report.merge is not None and report.assignment is not None:
                self.drop.record_split(report.merge.bytes_sent, report.merge.seconds)

    def _apply_merges(self, orders: set[MergeOrder], reports: list[StepReport]) -> None:
        """The members of each merged group now serve as one instance, led by its first rank."""
        for order in orders:
            leader = order.ranks[0]
            for member in order.ranks[1:]:
                self.instance_rank.pop(member, None)
                self.snapshots.pop(member, None)
                self.dispatcher.observe(member)
                # add_request never runs inside step(), and _take_commands emptied these queues
                assert not self._new.pop(member, None) and not self._aborts.pop(member, None)
                for request_id, instance in self.owner.items():
                    if instance == member:
                        self.owner[request_id] = leader
            self.drop.merged()
        for report in reports:
            if report.merge is not None and report.assignment is None:
                self.drop.record_merge(report.merge.seconds)

    def shutdown(self) -> list[RequestOutput]:
        """Abort everything in flight and release the workers; returns the abort outputs."""
        # Commands first: rank 0's drain may pair exchange rounds with a leader on another rank,
        # which drains (and runs them) when it gets its shutdown command.
        sent = PendingSends()
        for rank in range(1, self.world_size):
            sent.send_object(StepCommand(shutdown=True), rank, self.group)
        outputs = drain_rank(self.local_state)  # rank 0's own pipeline steps in flight (members wait on them)
        outputs += [self.local.abort_request(rid) for rid in list(self.local.requests)]
        outputs = [o for o in outputs if o is not None]
        for rank in range(1, self.world_size):
            outputs += self._collect(rank)
        sent.wait()
        self.owner.clear()
        return outputs

    # Internals ----------------------------------------------------------------------------
    def _take_commands(self, merges: dict) -> dict[int, StepCommand]:
        """One command per rank >= 1; pipeline members that are not leaders get empty ones."""
        commands = {rank: _regroup_command(StepCommand(), merges.get(rank)) for rank in range(1, self.world_size)}
        for instance, rank in self.instance_rank.items():
            if instance:
                command = StepCommand(tuple(self._new[instance]), tuple(self._aborts[instance]))
                commands[rank] = _regroup_command(command, merges.get(rank))
                self._new[instance].clear()
                self._aborts[instance].clear()
        return commands

    def _collect(self, rank: int) -> list[RequestOutput]:
        return self._absorb(recv_object(rank, self.group))

    def _absorb(self, report: StepReport) -> list[RequestOutput]:
        if report.error is not None:
            self.failed_steps += 1
        if report.snapshot is not None:
            self._record(report.snapshot.instance_id, report.snapshot)
        return list(report.outputs)

    def _record(self, instance_id: int, snapshot: InstanceSnapshot) -> None:
        self.snapshots[instance_id] = snapshot
        self.dispatcher.observe(instance_id)


def _regroup_command(command: StepCommand, order: MergeOrder | SplitOrder | None) -> StepCommand:
    if isinstance(order, MergeOrder):
        return attrs.evolve(command, merge=order)
    if isinstance(order, SplitOrder):
        return attrs.evolve(command, split=order)
    return command
