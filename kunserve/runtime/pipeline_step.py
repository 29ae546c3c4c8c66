"""What one pipeline step carries between a group's stages, and how a stage builds the inputs of
a micro-batch (``runtime/pipeline.py`` runs the steps).

A step (``StageStep``) is its micro-batches of ``StageChunk`` pieces, in the order they enter
every stage (``form_micro_batches``: the leader's scheduler output split by the group's batcher),
and the blocks to free first; no token ids travel (only stage 0 embeds). The last stage answers
with a ``StageResult``; each stage's compute seconds (``ComputeTimer``) ride along for the bubble
measurement (``StepTiming``). ``stage_inputs`` turns a micro-batch into attention metadata over
the stage's own block tables: the Triton path's on CUDA, the reference attention's elsewhere.
"""

from __future__ import annotations

import time

import attrs
import torch

from kunserve.policy.cost_model import ChunkWork
from kunserve.runtime.attention import AttentionMetadata
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.scheduler import SchedulerOutput


@attrs.frozen
class StageChunk:
    request_id: str
    start: int  # tokens of the request already in the KV cache
    num_tokens: int
    completes: bool  # a token is sampled from its last position
    greedy: bool = True  # the last stage takes the argmax; else it returns the logits row


@attrs.frozen
class StageStep:
    """One pipeline step as every stage needs it (no token ids: only stage 0 embeds). Its
    micro-batches enter every stage in order, so a request chunked across micro-batches has
    its earlier piece's KV written at each stage before the later piece reads it."""

    micro_batches: tuple[tuple[StageChunk, ...], ...]
    released: tuple[str, ...] = ()  # blocks to free first (finished, aborted or preempted)

    @property
    def chunks(self) -> tuple[StageChunk, ...]:
        return tuple(c for mb in self.micro_batches for c in mb)


@attrs.frozen
class StageResult:
    """The last stage's answer: greedy tokens, logits rows [vocab] the leader samples from
    with the request's own (seeded) generator, which therefore never leaves the leader, and
    the seconds each stage computed in this step (for the bubble measurement)."""

    tokens: dict[str, int]
    logits: dict[str, torch.Tensor]
    busy: dict[int, float] = attrs.Factory(dict)


@attrs.frozen
class StepTiming:
    """A group's step as the leader saw it: wall seconds since the previous step's result (or,
    after an idle spell, since this step's launch) to this step's result, and each member's
    compute seconds in the step. Over a run the walls add up to the time the group was busy,
    host work between steps included; a member is idle (a pipeline bubble) for ``wall - busy``."""

    wall: float
    busy: dict[int, float]
    leader: int = 0
    tokens: int = 0  # the step's tokens, and those of each of its micro-batches in order
    micro_batches: tuple[int, ...] = ()


def form_micro_batches(plan: SchedulerOutput, batcher) -> tuple[tuple[StageChunk, ...], ...]:
    """The step's chunks as micro-batches: one holding everything without a batcher, else the
    batcher's (``policy/batching.py``) split, a request's chunk possibly cut into pieces of which
    only the last may complete (sample a token)."""
    if not plan.chunks:
        return ()
    chunks = {c.request.request_id: c for c in plan.chunks}
    if batcher is None:
        return (tuple(_stage_chunk(c, c.start, c.num_tokens) for c in plan.chunks),)
    work = [ChunkWork(rid, c.start, c.num_tokens) for rid, c in chunks.items()]
    return tuple(tuple(_stage_chunk(chunks[w.request_id], w.prefix, w.num_tokens) for w in mb)
                 for mb in batcher.form(work))


def _stage_chunk(chunk, start: int, num_tokens: int) -> StageChunk:
    end = chunk.start + chunk.num_tokens
    return StageChunk(chunk.request.request_id, start, num_tokens, chunk.completes and start + num_tokens == end,
                      chunk.request.params.greedy)


def stage_inputs(chunks: tuple[StageChunk, ...], block_manager: BlockManager, device, config
                    ) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Attention metadata, positions [T] and logits rows [n] (integer tensors) of one micro-batch, from this
    member's own block tables (allocated here for the chunks; a no-op on the leader, whose
    scheduler allocated them). On CUDA the Triton path's metadata (``gpu_inputs.stage_step``),
    as a single instance's eager steps use; elsewhere the reference attention's."""
    for chunk in chunks:
        block_manager.allocate(chunk.request_id, chunk.start + chunk.num_tokens)
    if device.type == "cuda":
        from kunserve.runtime import gpu_inputs  # needs Triton

        dev = gpu_inputs.stage_step(chunks, block_manager, device, config.num_heads, config.num_kv_heads)
        return dev.meta, dev.positions, dev.logits_rows  # int32, as a single instance's steps use them
    query_lens, context_lens, tables, positions, rows = [], [], [], [], []
    for chunk in chunks:
        end = chunk.start + chunk.num_tokens
        query_lens.append(chunk.num_tokens)
        context_lens.append(end)
        tables.append(block_manager.block_table(chunk.request_id))
        positions.extend(range(chunk.start, end))
        if chunk.completes:
            rows.append(len(positions) - 1)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_manager.block_size, device)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return meta, as_long(positions), as_long(rows)


class ComputeTimer:
    """Seconds a stage computes in one step, for the bubble measurement. On CUDA, events around
    each micro-batch are read once when the step's total is asked for: one wait per step, never
    a host sync between micro-batches (which would stall the pipeline it measures)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._spans: list = []

    def begin(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def end(self, began) -> None:
        if not self.cuda:
            self.seconds += time.perf_counter() - began
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._spans.append((began, event))

    def total(self) -> float:
        if self._spans:
            self._spans[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._spans) / 1e3  # ms -> s
            self._spans.clear()
        return self.seconds
