"""CUDA graphs of the whole-model decode forward, one per bucketed batch size.

A decode step (one query per sequence) at batch B replays the graph of the smallest bucket
>= B. The graphs read their inputs from one static device buffer, filled each step by a single
host-to-device copy from a pinned staging buffer; rows past B are padding (slot -1: no K/V is
written; context 1 on block 0: a valid read whose output is dropped). The logits of every
bucket row come back in a static buffer; the caller slices the real rows.
"""

from __future__ import annotations

import gc
import logging

import torch

from kunserve.runtime.gpu_inputs import HostStep
from kunserve.runtime.kv_cache import PagedKVCache
from kunserve.runtime.triton_attention import TritonAttentionMetadata, decode_splits

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every 32 up to the first bucket >= max_batch."""
    buckets = [1, 2, 4, 8, 16, 32]
    while buckets[-1] < max_batch:
        buckets.append(buckets[-1] + 32)
    return [b for b in buckets if b < max_batch] + [next(b for b in buckets if b >= max_batch)]


def storage_key(kv_cache: PagedKVCache) -> tuple:
    """What a captured graph depends on: the KV base address and strides (not the block count:
    a drop that grows the cache at its tail keeps every graph valid)."""
    return kv_cache.storage.data_ptr(), kv_cache.storage.stride()


class DecodeGraphs:
    """Invariant: every captured graph reads the KV storage at ``self.storage_key`` and the
    model's current weights; ``matches(kv_cache)`` is False once the KV storage moved, after
    which the owner must build a new ``DecodeGraphs``. No reference to the KV storage is kept:
    the unified allocator refuses to unmap memory that a live tensor still views."""

    def __init__(self, model, kv_cache: PagedKVCache, device: torch.device, max_batch: int,
                 max_model_len: int, num_kv_heads: int):
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.storage_key = storage_key(kv_cache)
        self.block_size = kv_cache.block_size
        self.buckets = batch_buckets(max_batch)
        self.width = -(-max_model_len // self.block_size)  # block-table columns
        self.max_model_len = max_model_len
        self.num_kv_heads = num_kv_heads
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        n = self.buckets[-1]
        size = 4 * n + n * self.width  # ids | positions | slots | context lens | block tables
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.static = torch.zeros(size, dtype=torch.int32, device=device)
        self.ids, self.positions, self.slots, self.context_lens = self.static[: 4 * n].view(4, n)
        self.tables = self.static[4 * n:].view(n, self.width)
        self.copied = torch.cuda.Event()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    def matches(self, kv_cache: PagedKVCache) -> bool:
        return storage_key(kv_cache) == self.storage_key

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, all sharing one memory pool.

        The garbage collector is off while capturing: a collected unified-memory object would
        unmap (and synchronize) inside the capture, which invalidates it (seen in the tests)."""
        pool, stream = None, torch.cuda.Stream(self.device)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for bucket in reversed(self.buckets):
                self._stage_padding(0, bucket)
                self._upload()
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm up on the capture stream: kernels, handles
                    self._forward(bucket)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self._forward(bucket)
                pool = graph.pool()
                self.graphs[bucket] = (graph, logits)
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _forward(self, bucket: int) -> torch.Tensor:  # [bucket, vocab] fp32
        splits = decode_splits(bucket, self.num_kv_heads, self.max_model_len, self.num_sms)
        meta = TritonAttentionMetadata(
            slots=self.slots[:bucket], block_tables=self.tables[:bucket],
            context_lens=self.context_lens[:bucket], block_size=self.block_size, num_splits=splits,
        )
        hidden = self.model(self.ids[:bucket], self.positions[:bucket], self.kv_cache.by_layer(), meta)
        return self.model.compute_logits(hidden)

    def run(self, step: HostStep) -> torch.Tensor:  # [B, vocab] fp32, all rows of the step
        """Stage the step's inputs, copy them in one transfer, replay; no host sync here."""
        b = step.num_seqs
        bucket = self.bucket_for(b)
        self.copied.synchronize()  # the previous step's copy has read the staging buffer
        n, w = self.buckets[-1], step.tables.shape[1]
        h = self.host_np
        h[0:b], h[n:n + b], h[2 * n:2 * n + b], h[3 * n:3 * n + b] = (
            step.ids, step.positions, step.slots, step.context_lens)
        self.host_np[4 * n:].reshape(n, self.width)[:b, :w] = step.tables
        self._stage_padding(b, bucket)
        self._upload(rows=bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        self.num_replays += 1
        return logits[:b]

    def _stage_padding(self, first: int, last: int) -> None:
        """Rows [first, last): token 0 at position 0, no K/V write, context 1 on block 0."""
        n, h = self.buckets[-1], self.host_np
        h[first:last] = 0
        h[n + first:n + last] = 0
        h[2 * n + first:2 * n + last] = -1
        h[3 * n + first:3 * n + last] = 1
        h[4 * n:].reshape(n, self.width)[first:last, 0] = 0

    def _upload(self, rows: int | None = None) -> None:
        """Copy the vectors and the first ``rows`` block-table rows in one transfer."""
        n = self.buckets[-1]
        end = 4 * n + (n if rows is None else rows) * self.width
        self.static[:end].copy_(self.host[:end], non_blocking=True)
        self.copied.record()
