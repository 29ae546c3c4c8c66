"""Data-parallel cluster: one instance per rank, stepped in lockstep by rank 0.

Rank 0 runs the ``ClusterDriver``: it owns the global view (one ``InstanceSnapshot`` per
instance), dispatches each new request to an instance with the dispatch policy, and advances
the cluster one step at a time: send every worker a ``StepCommand`` (new requests, aborts),
step its own instance, then collect every worker's ``StepReport`` (outputs + snapshot).
Workers (ranks >= 1) run ``run_worker``: receive a command, apply it, step, report.

The driver has the same surface as ``LLMEngine`` (``add_request``, ``abort_request``, ``step``,
``has_unfinished_requests``), so the async front end drives one engine or a cluster alike.
Lockstep keeps every instance's view one step fresh and is what pipelined groups need later.
"""

from __future__ import annotations

import logging
import traceback

import attrs

from kunserve.outputs import RequestOutput
from kunserve.policy.dispatch import LoadBalancingDispatcher
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot
from kunserve.runtime.engine import LLMEngine
from kunserve.runtime.transport import recv_object, send_object
from kunserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@attrs.frozen
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None


@attrs.frozen
class StepCommand:
    new: tuple[NewRequest, ...] = ()
    aborts: tuple[str, ...] = ()
    shutdown: bool = False


@attrs.frozen
class StepReport:
    outputs: tuple[RequestOutput, ...]
    snapshot: InstanceSnapshot | None  # None from pipeline members that are not leaders
    error: str | None = None


def _apply_and_step(engine: LLMEngine, command: StepCommand, instance_id: int, always_step: bool) -> StepReport:
    """One worker step; an exception aborts this instance's requests instead of hanging them.
    A pipeline leader steps every time (``always_step``): its members expect every step."""
    outputs: list[RequestOutput] = []
    try:
        for r in command.new:
            engine.add_request(r.prompt_token_ids, r.params, r.request_id, r.arrival_time)
        outputs += [o for o in map(engine.abort_request, command.aborts) if o is not None]
        if command.shutdown:
            outputs += [engine.abort_request(rid) for rid in list(engine.requests)]
        elif always_step or engine.has_unfinished_requests():
            outputs += engine.step()
        return StepReport(tuple(outputs), engine.snapshot(instance_id))
    except Exception:  # noqa: BLE001 - reported to rank 0, which fails the affected requests
        error = traceback.format_exc()
        log.error("instance %d step failed:\n%s", instance_id, error)
        outputs += [engine.abort_request(rid) for rid in list(engine.requests)]
        return StepReport(tuple(outputs), engine.snapshot(instance_id), error)


def run_worker(engine: LLMEngine, instance_id: int, group, always_step: bool = False) -> None:
    """An instance (or pipeline leader) on a rank >= 1: serve rank 0's commands until it says
    shut down (or its connection drops)."""
    while True:
        command: StepCommand = recv_object(0, group)
        send_object(_apply_and_step(engine, command, instance_id, always_step), 0, group)
        if command.shutdown:
            return


def run_stage_member(stage, group) -> None:
    """A pipeline member that is not a leader: one stage step per cluster step."""
    while True:
        command: StepCommand = recv_object(0, group)
        if not command.shutdown:
            stage.step()
        send_object(StepReport((), None), 0, group)
        if command.shutdown:
            return


class ClusterDriver:
    """Rank 0's view and control of every instance.

    Invariants: ``owner`` maps every unfinished request id to its instance; a request id leaves
    ``owner`` exactly when its finished output is returned from ``step``.
    """

    def __init__(self, local_engine: LLMEngine, world_size: int = 1, group=None, pipeline_size: int = 1):
        if world_size % pipeline_size:
            raise ValueError(f"world size {world_size} is not a multiple of pipeline size {pipeline_size}")
        self.local = local_engine
        self.world_size = world_size
        self.group = group
        self.pipeline_size = pipeline_size
        # Instance i is the group led by rank i * pipeline_size; rank 0 leads instance 0.
        self.instance_rank = {i: i * pipeline_size for i in range(world_size // pipeline_size)}
        self.dispatcher = LoadBalancingDispatcher()
        self.snapshots = {i: local_engine.snapshot(i) for i in self.instance_rank}
        self.owner: dict[str, int] = {}
        self._new: dict[int, list[NewRequest]] = {i: [] for i in self.instance_rank if i}
        self._aborts: dict[int, list[str]] = {i: [] for i in self.instance_rank if i}
        self.failed_steps = 0

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

    def extra_metrics(self) -> dict:
        """Cluster-level counters for /metrics (the drop mechanism adds drops and restores)."""
        return {"cluster_instances": len(self.snapshots), "failed_steps_total": self.failed_steps}

    def step(self) -> list[RequestOutput]:
        commands = self._take_commands()
        for rank, command in commands.items():
            send_object(command, rank, self.group)
        pipelined = self.pipeline_size > 1  # members wait for every step of their leader
        outputs = self.local.step() if pipelined or self.local.has_unfinished_requests() else []
        self._record(0, self.local.snapshot(0))
        for rank in commands:
            outputs += self._collect(rank)
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        return outputs

    def shutdown(self) -> list[RequestOutput]:
        """Abort everything in flight and release the workers; returns the abort outputs."""
        outputs = [self.local.abort_request(rid) for rid in list(self.local.requests)]
        for rank in range(1, self.world_size):
            send_object(StepCommand(shutdown=True), rank, self.group)
        for rank in range(1, self.world_size):
            outputs += self._collect(rank)
        self.owner.clear()
        return outputs

    # Internals ----------------------------------------------------------------------------
    def _take_commands(self) -> dict[int, StepCommand]:
        """One command per rank >= 1; pipeline members that are not leaders get empty ones."""
        commands = {rank: StepCommand() for rank in range(1, self.world_size)}
        for instance, rank in self.instance_rank.items():
            if instance:
                commands[rank] = StepCommand(tuple(self._new[instance]), tuple(self._aborts[instance]))
                self._new[instance].clear()
                self._aborts[instance].clear()
        return commands

    def _collect(self, rank: int) -> list[RequestOutput]:
        report: StepReport = recv_object(rank, self.group)
        if report.error is not None:
            self.failed_steps += 1
        if report.snapshot is not None:
            self._record(report.snapshot.instance_id, report.snapshot)
        return list(report.outputs)

    def _record(self, instance_id: int, snapshot: InstanceSnapshot) -> None:
        self.snapshots[instance_id] = snapshot
        self.dispatcher.observe(instance_id)

