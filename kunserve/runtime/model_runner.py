"""Turns a ``SchedulerOutput`` into tensors, runs the model, samples the next tokens."""

from __future__ import annotations

import attrs
import torch

from kunserve.runtime.attention import AttentionMetadata
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.kv_cache import PagedKVCache
from kunserve.runtime.sampler import sample
from kunserve.runtime.scheduler import SchedulerOutput


@attrs.frozen
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [n] rows of T whose hidden state predicts a new token
    sampling_request_ids: tuple[str, ...]  # the n requests, in logits_indices order


def prepare_inputs(output: SchedulerOutput, block_manager: BlockManager, device) -> StepInputs:
    ids, positions, query_lens, context_lens, tables = [], [], [], [], []
    logits_indices, sampling_ids = [], []
    for chunk in output.chunks:
        request, start = chunk.request, chunk.request.num_computed_tokens
        end = start + chunk.num_tokens
        ids.extend(request.token_ids[start:end])
        positions.extend(range(start, end))
        query_lens.append(chunk.num_tokens)
        context_lens.append(end)
        tables.append(block_manager.block_table(request.request_id))
        if chunk.completes:
            logits_indices.append(len(ids) - 1)
            sampling_ids.append(request.request_id)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_manager.block_size, device)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return StepInputs(as_long(ids), as_long(positions), meta, as_long(logits_indices), tuple(sampling_ids))


class ModelRunner:
    """Runs one whole-model instance (all layers) over the paged KV cache."""

    def __init__(self, model, kv_cache: PagedKVCache, block_manager: BlockManager, device, seed: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = device
        self.default_generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def compute_logits(self, inputs: StepInputs) -> torch.Tensor:  # [n, vocab] fp32
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.by_layer(), inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of each request whose chunk completes."""
        if not output.chunks:
            return {}
        inputs = prepare_inputs(output, self.block_manager, self.device)
        logits = self.compute_logits(inputs)
        requests = {c.request.request_id: c.request for c in output.chunks}
        chosen = [requests[rid] for rid in inputs.sampling_request_ids]
        tokens = sample(
            logits, [r.params for r in chosen], [r.generator for r in chosen], self.default_generator
        )
        return dict(zip(inputs.sampling_request_ids, tokens))
