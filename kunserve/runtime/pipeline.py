"""Pipeline-parallel groups: several ranks each run a contiguous layer slice of one model.

The group's *leader* (stage 0) is an ordinary ``LLMEngine`` whose runner is a
``PipelineRunner``: it schedules over the group's one queue, splits the step into micro-batches
(``batcher``: lookahead or token-budget, ``policy/batching.py``; default one), sends a
``StageStep`` (what to compute) to stage 1 and then, micro-batch by micro-batch, runs the
embedding and its layers and sends the hidden states on without waiting. Every other member
runs ``StageWorker.step``: per micro-batch receive, run its layers over its own KV cache, send
on, so stage k works on micro-batch i while stage k - 1 computes i + 1; the last stage samples
and sends the tokens back to the leader. Each stage's compute seconds travel along (after the
micro-batches) so the leader can measure the bubbles: ``StepTiming``.

Block ids: the leader's block manager decides admission (all members size their pools alike);
each member mirrors the allocation in its own block manager, by request id, from the chunks
of each step, and frees what the leader reports finished or preempted. So every member holds
the same number of blocks for the same requests, and its physical ids are its own business.

A group steps every cluster step, even with nothing to run, so members never wait on a step
that does not come. Control objects go on the gloo group; hidden states on the data group
(NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import time
from collections import deque

import attrs
import torch
import torch.distributed as dist

from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.kv_cache import PagedKVCache
from kunserve.runtime.kv_exchange import KVExchange, LeaderExchange
from kunserve.runtime.pipeline_step import (ComputeTimer, StageResult, StageStep, StepTiming, form_micro_batches,
                                            stage_inputs)
from kunserve.runtime.sampler import sample
from kunserve.runtime.scheduler import SchedulerOutput
from kunserve.runtime.transport import PIPELINE_TAG, PendingSends, recv_object
from kunserve.runtime.weight_restore import WeightRestore


@attrs.frozen
class GroupLayout:
    """Ranks of one group in pipeline order; ``data_group`` carries hidden states."""

    ranks: tuple[int, ...]
    control_group: object = None
    data_group: object = None

    def next_rank(self, rank: int) -> int | None:
        i = self.ranks.index(rank)
        return self.ranks[i + 1] if i + 1 < len(self.ranks) else None

    def prev_rank(self, rank: int) -> int | None:
        i = self.ranks.index(rank)
        return self.ranks[i - 1] if i > 0 else None

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def last(self) -> int:
        return self.ranks[-1]


def transfer_pending(exchange: KVExchange | None, restore: WeightRestore | None) -> bool:
    """KV still moving after a merge, or weights still coming back before a split."""
    return any(t is not None and not t.done for t in (exchange, restore))


def run_transfer_round(exchange: KVExchange | None, restore: WeightRestore | None) -> list[str]:
    """One round of whichever transfer is running (leader and members alike); returns the
    requests whose KV is complete on every member after it."""
    ready = exchange.run_round() if exchange is not None and not exchange.done else []
    if restore is not None and not restore.done:
        restore.run_round()
    return ready


class StageWorker:
    """A non-leader member: runs its layer slice for every step the leader sends and, while a KV
    exchange (after a merge) or a weight pull (before a split) runs, one round of it per step.

    Round pairing: round ``k`` is a set of point-to-point transfers between the members that
    every member runs once. The leader runs it when it collects step ``k``'s result, which an
    overlapped leader does after launching step ``k + S - 1`` (S stages), during the cluster step
    in which this member computes step ``k + S - 2``; so a member runs round ``k`` right after
    its step ``k + S - 2`` (``round_lag`` = S - 2 steps). Both ends then reach the round at about
    the same time and neither stage waits for the other's step: the pipeline keeps overlapping
    while KV or weights move. Lockstep (the leader collects every step at once): lag 0.
    Invariant: ``_rounds_owed`` <= ``round_lag`` between steps; ``flush`` pays the rest.
    """

    def __init__(self, model, kv_cache: PagedKVCache, block_manager: BlockManager, device,
                 rank: int, layout: GroupLayout, exchange: KVExchange | None = None, overlap: bool = True):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.device, self.rank, self.layout = torch.device(device), rank, layout
        self.exchange = exchange
        self.overlap = overlap  # the leader keeps steps in flight (PipelineRunner.overlap): same in a group
        self._pending: deque[PendingSends] = deque()  # per step, oldest first
        self.restore: WeightRestore | None = None  # set when the group's weights come back
        self._rounds_owed = 0  # steps run while a transfer was pending whose round is still due

    @property
    def round_lag(self) -> int:
        return max(0, len(self.layout.ranks) - 2) if self.overlap else 0


    @torch.inference_mode()
    def step(self) -> None:
        prev, nxt = self.layout.prev_rank(self.rank), self.layout.next_rank(self.rank)
        control, data = self.layout.control_group, self.layout.data_group
        sends = PendingSends()
        step: StageStep = recv_object(prev, control, PIPELINE_TAG)
        if nxt is not None:
            sends.send_object(step, nxt, control, PIPELINE_TAG)  # early, so the next stage is waiting for micro-batch 0
        for request_id in step.released:
            self.block_manager.free(request_id)
        timer, tokens, logits = ComputeTimer(self.device), {}, {}
        for chunks in step.micro_batches:
            hidden = torch.empty(sum(c.num_tokens for c in chunks), self.model.config.hidden_size,
                                 dtype=self.model.config.dtype, device=self.device)  # [T, hidden]
            dist.recv(hidden, prev, group=data)
            start = timer.begin()
            meta, positions, rows = stage_inputs(chunks, self.block_manager, self.device, self.model.config)
            hidden = self.model(hidden, positions, self.kv_cache.by_layer(), meta)
            if nxt is None:
                self._sample(chunks, hidden, rows, tokens, logits)
            timer.end(start)
            if nxt is not None:  # asynchronous: the next micro-batch is computed meanwhile
                hidden = hidden.contiguous()
                sends.add(dist.isend(hidden, nxt, group=data), hidden)
        stage_busy = recv_object(prev, control, PIPELINE_TAG) | {self.rank: timer.total()}
        if nxt is not None:
            sends.send_object(stage_busy, nxt, control, PIPELINE_TAG)
        else:
            sends.send_object(StageResult(tokens, logits, stage_busy), self.layout.leader, control, PIPELINE_TAG)
        self._settle(sends)
        if transfer_pending(self.exchange, self.restore):  # after the activations: they never wait behind KV or weights
            self._rounds_owed += 1
        self._pay_rounds(self.round_lag)

    def _pay_rounds(self, keep: int) -> None:
        """Run owed rounds until ``keep`` are left (see the class docstring for the pairing)."""
        while self._rounds_owed > keep:
            self._rounds_owed -= 1
            run_transfer_round(self.exchange, self.restore)

    def _settle(self, sends: PendingSends) -> None:
        """Lockstep: this step's sends complete now. Overlapped: the leader takes a step's result
        only after launching (stages - 1) more steps, so up to that many steps' sends stay
        pending here; older ones have been taken by now."""
        self._pending.append(sends)
        keep = len(self.layout.ranks) - 1 if self.overlap else 0
        while len(self._pending) > keep:
            self._pending.popleft().wait()

    def flush(self) -> None:
        """Wait until every send of this stage was received and run the rounds still due (before
        a regroup or shutdown: the leader's drain collects the steps in flight and runs theirs)."""
        while self._pending:
            self._pending.popleft().wait()
        self._pay_rounds(0)

    def _sample(self, chunks, hidden: torch.Tensor, rows: torch.Tensor, tokens: dict, logits_out: dict) -> None:
        completing = [c for c in chunks if c.completes]
        if not completing:
            return
        logits = self.model.compute_logits(hidden[rows])  # [n, vocab] fp32
        greedy = logits.argmax(dim=-1).tolist()
        tokens.update({c.request_id: t for c, t in zip(completing, greedy) if c.greedy})
        logits_out.update({c.request_id: logits[i].cpu() for i, c in enumerate(completing) if not c.greedy})


@attrs.frozen
class _Launched:
    """A step stage 0 has run and sent on, awaiting the last stage's result."""

    plan: SchedulerOutput
    sends: PendingSends
    started: float
    micro_batch_tokens: tuple[int, ...]


class PipelineRunner:
    """The leader's runner: same ``execute(plan) -> {request_id: token}`` as ``ModelRunner``,
    computed across the group, plus ``launch`` / ``collect`` for overlapped steps. Tracks which
    requests the other stages hold blocks for."""

    def __init__(self, model, kv_cache: PagedKVCache, block_manager: BlockManager, scheduler, device,
                 rank: int, layout: GroupLayout, seed: int = 0, exchange: LeaderExchange | None = None,
                 batcher=None, overlap: bool = True):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.scheduler, self.device, self.rank, self.layout = scheduler, torch.device(device), rank, layout
        self._holding: set[str] = set()  # requests the members hold blocks for
        self.default_generator = torch.Generator().manual_seed(seed)
        self.exchange = exchange
        self.batcher = batcher  # micro-batch policy (policy/batching.py); None: one per step
        self.restore: WeightRestore | None = None  # set when the group's weights come back
        self.timings: list[StepTiming] = []  # since the owner last took them (``take_timings``)
        # Overlapped: up to (stages - 1) launched steps await their result (see LLMEngine.step).
        self.overlap = overlap
        self._in_flight: deque[_Launched] = deque()
        self._last_collected, self._streak = 0.0, False  # the previous result's time; had it work?
        if exchange is not None:
            self._holding |= set(exchange.start())

    @property
    def exchange_pending(self) -> bool:
        """KV still moving after a merge, or weights still coming back before a split: the
        group must not be regrouped meanwhile."""
        return transfer_pending(self.exchange, self.restore)

    @property
    def _kv_exchange_pending(self) -> bool:
        return self.exchange is not None and not self.exchange.done

    def take_timings(self) -> list[StepTiming]:
        timings, self.timings = self.timings, []
        return timings

    @property
    def num_virtual_engines(self) -> int:
        """Request sets stepped in turn: one per stage when steps overlap, so the next set's
        step enters stage 0 while the earlier sets' steps are still in the later stages."""
        return len(self.layout.ranks) if self.overlap else 1

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> dict[str, int]:
        """Lockstep: run one step through every stage and return its tokens."""
        self.launch(plan)
        _plan, tokens = self.collect()
        self.after_step()
        return tokens

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput) -> None:
        """Send the step to the group and run stage 0 over its micro-batches; returns without
        waiting for the later stages (``collect`` takes the result)."""
        step = self._stage_step(plan)
        if self._kv_exchange_pending:
            self.exchange.note_scheduled(c.request_id for c in step.chunks)
        nxt, control, data = self.layout.next_rank(self.rank), self.layout.control_group, self.layout.data_group
        sends = PendingSends()
        sends.send_object(step, nxt, control, PIPELINE_TAG)
        requests = {c.request.request_id: c.request for c in plan.chunks}
        started = time.perf_counter()
        timer = ComputeTimer(self.device)
        for chunks in step.micro_batches:
            start = timer.begin()
            ids = [t for c in chunks for t in requests[c.request_id].token_ids[c.start:c.start + c.num_tokens]]
            meta, positions, _rows = stage_inputs(chunks, self.block_manager, self.device, self.model.config)
            hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), positions,
                                self.kv_cache.by_layer(), meta).contiguous()  # [T, hidden]
            timer.end(start)
            sends.add(dist.isend(hidden, nxt, group=data), hidden)  # the next stage starts now
        sends.send_object({self.rank: timer.total()}, nxt, control, PIPELINE_TAG)
        sizes = tuple(sum(c.num_tokens for c in mb) for mb in step.micro_batches)
        self._in_flight.append(_Launched(plan, sends, started, sizes))

    @torch.inference_mode()
    def collect(self) -> tuple[SchedulerOutput, dict[str, int]]:
        """Wait for the oldest launched step's result: (its plan, sampled tokens)."""
        launched = self._in_flight.popleft()
        launched.sends.wait()
        result: StageResult = recv_object(self.layout.last, self.layout.control_group, PIPELINE_TAG)
        now = time.perf_counter()
        has_work = bool(launched.plan.chunks)
        if has_work:
            # wall: since the previous result while steps with work follow each other (host work
            # between steps is idle time for every stage, overlapped or not), else since launch
            since = self._last_collected if self._streak else launched.started
            sizes = launched.micro_batch_tokens
            self.timings.append(StepTiming(now - since, result.busy, self.rank, sum(sizes), sizes))
        self._streak, self._last_collected = has_work, now
        return launched.plan, {**result.tokens, **self._sample_rows(launched.plan, result.logits)}

    def after_step(self) -> None:
        """The round of a running KV exchange or weight restore for the step just collected:
        exactly one per step, as every member runs one per step (``StageWorker`` pairs them)."""
        self._holding |= set(run_transfer_round(self.exchange, self.restore))  # resumed: members hold their blocks

    def _sample_rows(self, plan: SchedulerOutput, rows: dict[str, torch.Tensor]) -> dict[str, int]:
        if not rows:
            return {}
        requests = [c.request for c in plan.chunks if c.request.request_id in rows]
        logits = torch.stack([rows[r.request_id] for r in requests])  # [n, vocab]
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests], self.default_generator)
        return {r.request_id: t for r, t in zip(requests, tokens)}

    def _stage_step(self, plan: SchedulerOutput) -> StageStep:
        scheduled = {c.request.request_id for c in plan.chunks}
        holding_now = scheduled | {r.request_id for r in self.scheduler.running}
        released = tuple(sorted(self._holding - holding_now))  # finished, aborted or preempted
        self._holding = (self._holding - set(released)) | scheduled
        return StageStep(form_micro_batches(plan, self.batcher), released)
