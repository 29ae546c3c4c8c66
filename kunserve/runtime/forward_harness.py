"""Timing one batch's forward pass on a device, for the profiler (``python -m kunserve.profile``).

``ForwardHarness`` holds a whole model and a paged KV cache (no engine, no scheduler) and turns a
batch of (prefix, new tokens) chunks into a function that runs the engine's forward over it: the
eager CUDA step (Triton attention, q/k/v merged as the engine merges them) or the CPU reference
path. It times that function on the host clock (``wall_seconds``) or, on CUDA, on the GPU alone
with the host's launches hidden behind a GPU sleep (``device_seconds``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import attrs
import torch


class ForwardHarness:
    """One whole model and a paged KV cache on ``device``; ``prepare(chunks)`` returns a
    function that runs one forward (+ logits) of that batch."""

    def __init__(self, model_dir: Path, load_format: str, dtype: torch.dtype, device: torch.device,
                 block_size: int, seed: int = 0):
        from kunserve.models import ModelConfig, build_model, load_dummy, load_safetensors

        config = attrs.evolve(ModelConfig.from_dir(model_dir), dtype=dtype)
        with torch.device("meta"):
            self.model = build_model(config)
        if load_format == "dummy":
            load_dummy(self.model, dtype, device, seed=seed)
        else:
            load_safetensors(self.model, model_dir, dtype, device)
        self.model.eval()
        self.config, self.device, self.block_size = config, device, block_size
        self.cuda = device.type == "cuda"
        if self.cuda:
            merge_qkv(self.model)
        self.kv_cache = None

    def allocate_kv(self, num_blocks: int) -> None:
        """A KV cache of ``num_blocks`` blocks (sized to the grid's largest batch)."""
        from kunserve.runtime.kv_cache import PagedKVCache

        cfg = self.config
        self.kv_cache = None  # free the old one first
        self.kv_cache = PagedKVCache.allocate(num_blocks, self.model.layer_ids, self.block_size,
                                              cfg.num_kv_heads, cfg.head_dim, cfg.dtype, self.device)

    def prepare(self, chunks: list[tuple[int, int]]) -> Callable[[], None]:
        from kunserve.runtime.block_manager import BlockManager
        from kunserve.runtime.request import Request
        from kunserve.runtime.scheduler import ScheduledChunk
        from kunserve.sampling_params import SamplingParams

        manager = BlockManager(self.kv_cache.num_blocks, self.block_size)
        scheduled = []
        for i, (prefix, num_tokens) in enumerate(chunks):
            rid, length = str(i), prefix + num_tokens
            # One repeated token id: the values do not change the time, building 10^6 ids would.
            request = Request(rid, [i % self.config.vocab_size] * length, SamplingParams(max_tokens=1),
                              length + 1)
            request.num_computed_tokens = prefix
            manager.allocate(rid, length)
            scheduled.append(ScheduledChunk(request, num_tokens))
        return self._gpu_step(scheduled, manager) if self.cuda else self._cpu_step(scheduled, manager)

    def _cpu_step(self, scheduled, manager) -> Callable[[], None]:
        from kunserve.runtime.model_runner import prepare_inputs
        from kunserve.runtime.scheduler import SchedulerOutput

        inputs = prepare_inputs(SchedulerOutput(tuple(scheduled)), manager, self.device)
        return self._forward(inputs.input_ids, inputs.positions, inputs.meta, inputs.logits_indices)

    def _gpu_step(self, scheduled, manager) -> Callable[[], None]:
        """The engine's eager CUDA step (``CudaPath._eager_logits``) without the host part."""
        from kunserve.runtime import gpu_inputs

        cfg = self.config
        dev = gpu_inputs.upload_eager(gpu_inputs.HostStep.build(scheduled, manager), self.device, self.block_size,
                                      cfg.num_heads, cfg.num_kv_heads)
        return self._forward(dev.ids, dev.positions, dev.meta, dev.logits_rows)

    def _forward(self, ids, positions, meta, rows) -> Callable[[], None]:
        """The timed work: the forward over inputs already on the device, plus the logits."""
        caches = self.kv_cache.by_layer()

        @torch.inference_mode()
        def run() -> None:
            hidden = self.model(ids, positions, caches, meta)  # [T, hidden]
            self.model.compute_logits(hidden[rows])  # [k, vocab]
        return run

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall_seconds(self, run: Callable[[], None]) -> tuple[float, float]:
        """(seconds until the forward has finished, seconds the host spent enqueuing it)."""
        self.sync()
        start = time.perf_counter()
        run()
        enqueued = time.perf_counter() - start
        self.sync()
        return time.perf_counter() - start, enqueued

    def calibrate_sleep(self) -> None:
        """GPU sleep cycles per second, for ``device_seconds`` (call with the GPU warm)."""
        cycles = 50_000_000
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        self.sleep_cycles_per_s = cycles / (begin.elapsed_time(end) / 1e3)

    def device_seconds(self, run: Callable[[], None], enqueue_s: float) -> float | None:
        """Seconds the GPU spends on one forward with the host's launch overhead hidden: the
        GPU first sleeps longer than the host takes to enqueue the forward, so the forward's
        kernels run back to back. None if the host never got ahead (three tries)."""
        for attempt in range(3):
            sleep_s = min(max(2 * enqueue_s, 2e-3) * 2**attempt, 0.5)
            asleep, begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            self.sync()
            asleep.record()
            torch.cuda._sleep(int(sleep_s * self.sleep_cycles_per_s))
            begin.record()
            start = time.perf_counter()
            run()
            enqueue_s = time.perf_counter() - start
            end.record()
            end.synchronize()
            if enqueue_s < 0.9 * asleep.elapsed_time(begin) / 1e3:  # enqueued before the GPU woke
                return begin.elapsed_time(end) / 1e3
        return None


def merge_qkv(model) -> None:
    """One q/k/v GEMM per layer, as the engine runs on CUDA when its allocator placed the three
    weights back to back (``model_runner.merge_qkv_weights``); layers with biases keep three."""
    for layer in model.model.layers.values():
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if any(p.bias is not None for p in projections):
            continue
        merged = torch.cat([p.weight for p in projections])  # [q + 2 kv rows, hidden]
        start = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight = torch.nn.Parameter(merged[start:start + rows], requires_grad=False)
            start += rows
        attn.qkv_weight = merged
