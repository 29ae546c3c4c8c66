"""Turns a ``SchedulerOutput`` into tensors, runs the model, samples the next tokens.

Two paths: on the CPU (and any non-CUDA device) ``prepare_inputs`` builds the reference
``AttentionMetadata``; on CUDA ``gpu_inputs`` builds device metadata for the Triton kernels and
decode steps replay CUDA graphs (``cuda_graphs``) unless ``enforce_eager``. The only host sync
of a CUDA step is reading the sampled tokens.
"""

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
        request, start = chunk.request, chunk.start
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

    def __init__(self, model, kv_cache: PagedKVCache, block_manager: BlockManager, device, seed: int = 0,
                 *, enforce_eager: bool = True, max_num_seqs: int = 256, max_model_len: int | None = None,
                 weight_placement=None):
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.device = torch.device(device)
        self.default_generator = torch.Generator().manual_seed(seed)
        self.cuda = None
        if self.device.type == "cuda":
            merge_qkv_weights(model, weight_placement)
            self.cuda = CudaPath(self, enforce_eager, max_num_seqs, max_model_len)

    @torch.inference_mode()
    def compute_logits(self, inputs: StepInputs) -> torch.Tensor:  # [n, vocab] fp32
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.by_layer(), inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of each request whose chunk completes."""
        if not output.chunks:
            return {}
        if self.cuda is not None:
            logits, sampling_ids = self.cuda.logits(output)
        else:
            inputs = prepare_inputs(output, self.block_manager, self.device)
            logits, sampling_ids = self.compute_logits(inputs), inputs.sampling_request_ids
        requests = {c.request.request_id: c.request for c in output.chunks}
        chosen = [requests[rid] for rid in sampling_ids]
        tokens = sample(
            logits, [r.params for r in chosen], [r.generator for r in chosen], self.default_generator
        )
        return dict(zip(sampling_ids, tokens))


def merge_qkv_weights(model, placement) -> int:
    """Give each attention layer one view over its q/k/v weights where the unified allocator
    placed them back to back (no copy; layers with biases keep three GEMMs). Returns how many.
    The views cover executed layers only, which are never dropped, so they stay valid."""
    if placement is None:
        return 0
    merged = 0
    for layer_id, layer in model.model.layers.items():
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if any(p.bias is not None for p in projections):
            continue
        names = [f"model.layers.{layer_id}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
        offsets = [placement.offsets[n] for n in names]
        ends = [at + p.weight.numel() * p.weight.element_size() for at, p in zip(offsets, projections)]
        if offsets[1:] != ends[:-1]:
            continue
        rows = sum(p.weight.shape[0] for p in projections)
        weight = attn.q_proj.weight
        attn.qkv_weight = placement.memory.layer_view(int(layer_id), offsets[0], (rows, weight.shape[1]), weight.dtype)
        merged += 1
    return merged


class CudaPath:
    """The CUDA step: Triton attention metadata built once per step; decode steps replay a
    CUDA graph of the smallest fitting batch bucket, other steps run eagerly."""

    def __init__(self, runner: ModelRunner, enforce_eager: bool, max_num_seqs: int, max_model_len: int | None):
        from kunserve.runtime import cuda_graphs, gpu_inputs, triton_attention  # need Triton

        self.runner, self.inputs, self.attention, self.graph_module = runner, gpu_inputs, triton_attention, cuda_graphs
        cfg = runner.model.config
        self.num_kv_heads = cfg.num_kv_heads
        self.query_tile = triton_attention.query_tile_for(cfg.num_heads, cfg.num_kv_heads)
        self.num_sms = torch.cuda.get_device_properties(runner.device).multi_processor_count
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        # Graphs capture token ids -> logits, i.e. a whole model (not a middle pipeline stage).
        self.use_graphs = not enforce_eager and runner.model.is_first and runner.model.is_last
        self.graphs = None
        block_size = runner.kv_cache.block_size
        self.table_cache = gpu_inputs.BlockTableCache(2 * max_num_seqs + 8, -(-self.max_model_len // block_size))
        if self.use_graphs:
            self._build_graphs()

    def _build_graphs(self) -> None:
        r = self.runner
        self.graphs = self.graph_module.DecodeGraphs(
            r.model, r.kv_cache, r.device, self.max_num_seqs, self.max_model_len, self.num_kv_heads)
        self.graphs.capture()

    def logits(self, output: SchedulerOutput) -> tuple[torch.Tensor, tuple[str, ...]]:
        """[n, vocab] fp32 logits of the requests that sample this step, and their ids."""
        self.table_cache.reset_if_remapped(self.runner.kv_cache.storage)
        step = self.inputs.HostStep.build(output.chunks, self.runner.block_manager, self.table_cache)
        if self._graph_fits(step):
            if not self.graphs.matches(self.runner.kv_cache):
                self._build_graphs()  # the KV storage was remapped (drop / restore)
            logits = self.graphs.run(step)
            if len(step.sampling_ids) < step.num_seqs:  # a 1-token chunk of an unfinished prefill
                logits = logits[torch.from_numpy(step.logits_rows).to(logits.device, non_blocking=True)]
            return logits, step.sampling_ids
        return self._eager_logits(step), step.sampling_ids

    def _graph_fits(self, step) -> bool:
        return (self.use_graphs and step.is_decode and step.num_seqs <= self.graphs.buckets[-1]
                and step.tables.shape[1] <= self.graphs.width)

    @torch.inference_mode()
    def _eager_logits(self, step) -> torch.Tensor:
        r = self.runner
        max_ctx = int(step.context_lens.max())
        splits = self.attention.decode_splits(step.num_seqs, self.num_kv_heads, max_ctx, self.num_sms)
        dev = self.inputs.upload(step, r.device, r.kv_cache.block_size, self.query_tile, splits)
        # Fresh views each step: holding them would keep the unified allocator from unmapping.
        hidden = r.model(dev.ids, dev.positions, r.kv_cache.by_layer(), dev.meta)
        return r.model.compute_logits(hidden[dev.logits_rows])
