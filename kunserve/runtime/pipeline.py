"""Pipeline-parallel groups: several ranks each run a contiguous layer slice of one model.

The group's *leader* (stage 0) is an ordinary ``LLMEngine`` whose runner is a
``PipelineRunner``: it schedules over the group's one queue, runs the embedding and its layers,
and sends a ``StageStep`` (what to compute) with the hidden states to stage 1. Every other
member runs ``StageWorker.step``: receive, run its layers over its own KV cache, send on; the
last stage samples and sends the tokens back to the leader.

Block ids: the leader's block manager decides admission (all members size their pools alike);
each member mirrors the allocation in its own block manager, by request id, from the chunks
of each step, and frees what the leader reports finished or preempted. So every member holds
the same number of blocks for the same requests, and its physical ids are its own business.

A group steps every cluster step, even with nothing to run, so members never wait on a step
that does not come. Control objects go on the gloo group; hidden states on the data group
(NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import attrs
import torch
import torch.distributed as dist

from kunserve.runtime.attention import AttentionMetadata
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.kv_cache import PagedKVCache
from kunserve.runtime.kv_exchange import KVExchange, LeaderExchange
from kunserve.runtime.model_runner import prepare_inputs
from kunserve.runtime.sampler import sample
from kunserve.runtime.scheduler import SchedulerOutput
from kunserve.runtime.transport import recv_object, send_object


@attrs.frozen
class StageChunk:
    request_id: str
    start: int  # tokens of the request already in the KV cache
    num_tokens: int
    completes: bool  # a token is sampled from its last position
    greedy: bool = True  # the last stage takes the argmax; else it returns the logits row


@attrs.frozen
class StageStep:
    """One pipeline step as every stage needs it (no token ids: only stage 0 embeds)."""

    chunks: tuple[StageChunk, ...]
    released: tuple[str, ...] = ()  # blocks to free first (finished, aborted or preempted)


@attrs.frozen
class StageResult:
    """The last stage's answer: greedy tokens, and logits rows [vocab] the leader samples from
    with the request's own (seeded) generator, which therefore never leaves the leader."""

    tokens: dict[str, int]
    logits: dict[str, torch.Tensor]


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


def _stage_metadata(step: StageStep, block_manager: BlockManager, device) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Attention metadata, positions [T] and logits rows [n] of a step, from this member's
    own block tables (allocated here for the step's chunks)."""
    query_lens, context_lens, tables, positions, rows = [], [], [], [], []
    for chunk in step.chunks:
        end = chunk.start + chunk.num_tokens
        block_manager.allocate(chunk.request_id, end)
        query_lens.append(chunk.num_tokens)
        context_lens.append(end)
        tables.append(block_manager.block_table(chunk.request_id))
        positions.extend(range(chunk.start, end))
        if chunk.completes:
            rows.append(len(positions) - 1)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_manager.block_size, device)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return meta, as_long(positions), as_long(rows)


class StageWorker:
    """A non-leader member: runs its layer slice for every step the leader sends, then (after a
    merge, until it is done) one round of the KV exchange."""

    def __init__(self, model, kv_cache: PagedKVCache, block_manager: BlockManager, device,
                 rank: int, layout: GroupLayout, exchange: KVExchange | None = None):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.device, self.rank, self.layout = torch.device(device), rank, layout
        self.exchange = exchange

    @torch.inference_mode()
    def step(self) -> None:
        prev = self.layout.prev_rank(self.rank)
        step: StageStep = recv_object(prev, self.layout.control_group)
        hidden = torch.empty(sum(c.num_tokens for c in step.chunks), self.model.config.hidden_size,
                             dtype=self.model.config.dtype, device=self.device)
        dist.recv(hidden, prev, group=self.layout.data_group)
        for request_id in step.released:
            self.block_manager.free(request_id)
        meta, positions, rows = _stage_metadata(step, self.block_manager, self.device)
        if step.chunks:
            hidden = self.model(hidden, positions, self.kv_cache.by_layer(), meta)
        nxt = self.layout.next_rank(self.rank)
        if nxt is not None:
            send_object(step, nxt, self.layout.control_group)
            dist.send(hidden.contiguous(), nxt, group=self.layout.data_group)
        else:
            send_object(self._result(step, hidden, rows), self.layout.leader, self.layout.control_group)
        if self.exchange is not None and not self.exchange.done:
            self.exchange.run_round()  # after the activations: they never wait behind KV

    def _result(self, step: StageStep, hidden: torch.Tensor, rows: torch.Tensor) -> StageResult:
        completing = [c for c in step.chunks if c.completes]
        if not completing:
            return StageResult({}, {})
        logits = self.model.compute_logits(hidden[rows])  # [n, vocab] fp32
        greedy = logits.argmax(dim=-1).tolist()
        tokens = {c.request_id: t for c, t in zip(completing, greedy) if c.greedy}
        rows_out = {c.request_id: logits[i].cpu() for i, c in enumerate(completing) if not c.greedy}
        return StageResult(tokens, rows_out)


class PipelineRunner:
    """The leader's runner: same ``execute(plan) -> {request_id: token}`` as ``ModelRunner``,
    computed across the group. Tracks which requests the other stages hold blocks for."""

    def __init__(self, model, kv_cache: PagedKVCache, block_manager: BlockManager, scheduler, device,
                 rank: int, layout: GroupLayout, seed: int = 0, exchange: LeaderExchange | None = None):
        self.model, self.kv_cache, self.block_manager = model, kv_cache, block_manager
        self.scheduler, self.device, self.rank, self.layout = scheduler, torch.device(device), rank, layout
        self._holding: set[str] = set()  # requests the members hold blocks for
        self.default_generator = torch.Generator().manual_seed(seed)
        self.exchange = exchange
        if exchange is not None:
            self._holding |= set(exchange.start())

    @property
    def exchange_pending(self) -> bool:
        return self.exchange is not None and not self.exchange.done

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> dict[str, int]:
        step = self._stage_step(plan)
        if self.exchange_pending:
            self.exchange.note_scheduled(c.request_id for c in step.chunks)
        if plan.chunks:
            inputs = prepare_inputs(plan, self.block_manager, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.by_layer(), inputs.meta)
        else:
            hidden = torch.empty(0, self.model.config.hidden_size, dtype=self.model.config.dtype, device=self.device)
        nxt = self.layout.next_rank(self.rank)
        send_object(step, nxt, self.layout.control_group)
        dist.send(hidden.contiguous(), nxt, group=self.layout.data_group)
        result: StageResult = recv_object(self.layout.last, self.layout.control_group)
        if self.exchange_pending:
            self._holding |= set(self.exchange.run_round())  # resumed: members hold their blocks
        return {**result.tokens, **self._sample_rows(plan, result.logits)}

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
        chunks = tuple(
            StageChunk(c.request.request_id, c.request.num_computed_tokens, c.num_tokens, c.completes,
                       c.request.params.greedy)
            for c in plan.chunks
        )
        return StageStep(chunks, released)
