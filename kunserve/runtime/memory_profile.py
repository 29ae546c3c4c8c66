"""Profile the activation memory of one forward pass, to size the KV cache on CUDA.

Layers run one after another and free their intermediates, so the peak activation of a whole
model equals that of a one-layer copy (plus the embedding output and the logits, which the
copy has too). Profiling a one-layer copy needs no loaded weights and a few hundred MB only.
"""

from __future__ import annotations

import attrs
import torch

from kunserve.models import ModelConfig, build_model, load_dummy
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.kv_cache import PagedKVCache
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import ScheduledChunk
from kunserve.sampling_params import SamplingParams


def peak_activation_bytes(model_config: ModelConfig, dtype: torch.dtype, device: torch.device,
                          num_tokens: int, block_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """Bytes a forward of ``num_tokens`` tokens (sequences of up to ``max_model_len - 1``) plus
    the logits of ``min(num_tokens, max_num_seqs)`` rows allocates beyond weights and KV."""
    from kunserve.runtime import gpu_inputs, triton_attention

    cfg = attrs.evolve(model_config, num_layers=1, sliding_window=model_config.sliding_window[:1])
    with torch.device("meta"):
        model = build_model(cfg)
    load_dummy(model, dtype, device)
    model.eval()
    seq_len = max(1, min(num_tokens, max_model_len - 1))
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    manager = BlockManager(sum(-(-n // block_size) for n in lens), block_size)
    chunks = []
    for i, n in enumerate(lens):
        manager.allocate(str(i), n)
        chunks.append(ScheduledChunk(Request(str(i), [0] * n, SamplingParams(max_tokens=1), n + 1), n))
    kv = PagedKVCache.allocate(manager.num_blocks, range(1), block_size, cfg.num_kv_heads, cfg.head_dim,
                               dtype, device)
    step = gpu_inputs.HostStep.build(chunks, manager)
    query_tile = triton_attention.query_tile_for(cfg.num_heads, cfg.num_kv_heads)
    dev = gpu_inputs.upload(step, device, block_size, query_tile, num_splits=1)
    with torch.inference_mode():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        hidden = model(dev.ids, dev.positions, kv.by_layer(), dev.meta)
        model.compute_logits(hidden[: min(num_tokens, max_num_seqs)])
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    del model, kv, dev, hidden
    torch.cuda.empty_cache()  # hand the profile's blocks back: the KV cache may come from the driver
    return peak
