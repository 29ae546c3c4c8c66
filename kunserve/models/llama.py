"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) as one configurable module.

Parameter names are exactly the Hugging Face ones (``model.layers.7.self_attn.q_proj.weight``)
so weights load by name. A model is built for a contiguous layer range ``[first, last)``:
the embedding exists only on the stage that owns layer 0, the final norm and ``lm_head`` only
on the stage that owns the last layer. Pipeline stages pass hidden states between them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from kunserve.models.config import ModelConfig
from kunserve.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from kunserve.runtime.attention import AttentionMetadata, paged_attention, write_kv

# CUDA only: fused Triton kernels for RMSNorm, rotary and SiLU-and-multiply (KUNSERVE_FUSED_OPS=0
# keeps the plain PyTorch ops, e.g. to measure what the fusion buys).
_FUSED_OPS = os.environ.get("KUNSERVE_FUSED_OPS", "1") != "0"


def _fused(x: torch.Tensor):
    """The fused-kernel module when ``x`` lives on CUDA, else None (the PyTorch reference ops)."""
    if not (_FUSED_OPS and x.is_cuda):
        return None
    from kunserve.models import fused_ops

    return fused_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (fused := _fused(x)) is not None:
            return fused.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 and cast back before the weight, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        # Qwen2 has bias on q/k/v only; Llama's attention_bias covers o_proj too.
        o_bias = bias and cfg.architecture != "Qwen2ForCausalLM"
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Optional [q + k + v rows, hidden] view over the three weights when they lie back to back
        # (set by the CUDA model runner): one GEMM instead of three, faster at decode batch sizes.
        self.qkv_weight: torch.Tensor | None = None
        self._qkv_sizes = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                           cfg.num_kv_heads * cfg.head_dim)

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]  # x: [T, hidden]
        if self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight).split(self._qkv_sizes, dim=-1)  # strided views
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if (fused := _fused(x)) is not None:
            q, k = fused.rotary(q, cos, sin), fused.rotary(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        if (fused := _fused(x)) is not None:
            return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.sliding_window[layer_id] if cfg.sliding_window else None)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, fused, x, pending, cos, sin, kv_cache, meta):
        """The same layer with each residual add fused into the RMSNorm after it (CUDA).

        ``pending`` is the previous layer's MLP output not yet added to ``x`` (None before the
        first layer); returns ``(x, this layer's MLP output)``, again not yet added."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            x, h = fused.add_rms_norm(x, pending, self.input_layernorm.weight, self.input_layernorm.eps)
        attn = self.self_attn(h, cos, sin, kv_cache, meta)
        x, h = fused.add_rms_norm(x, attn, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return x, self.mlp(h)


class DecoderBody(nn.Module):
    """The ``model.`` prefix of HF names: embedding, layers (keyed by global index), norm."""

    def __init__(self, cfg: ModelConfig, first: int, last: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if first == 0 else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(first, last)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last == cfg.num_layers else None


class LlamaForCausalLM(nn.Module):
    """One pipeline stage (or the whole model) of a Llama-family decoder.

    Invariant: ``layer_range`` is a non-empty ``[first, last)`` within ``[0, num_layers)``;
    ``is_first`` ⇔ it owns the embedding, ``is_last`` ⇔ it owns norm and lm_head.
    ``forward`` takes token ids on the first stage and hidden states elsewhere.
    """

    def __init__(self, cfg: ModelConfig, layer_range: tuple[int, int] | None = None):
        super().__init__()
        first, last = layer_range or (0, cfg.num_layers)
        if not 0 <= first < last <= cfg.num_layers:
            raise ValueError(
                f"layer_range {layer_range} must satisfy 0 <= first < last <= {cfg.num_layers}"
            )
        self.config = cfg
        self.layer_range = (first, last)
        self.model = DecoderBody(cfg, first, last)
        self.is_first, self.is_last = first == 0, last == cfg.num_layers
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        self._inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    @property
    def layer_ids(self) -> range:
        return range(*self.layer_range)

    def hf_weight_name(self, param_name: str) -> str:
        """Checkpoint tensor holding ``param_name`` (tied heads read the embedding)."""
        if param_name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return param_name

    def forward(
        self,
        inputs: torch.Tensor,  # [T] token ids (first stage) or [T, hidden] hidden states
        positions: torch.Tensor,  # [T]
        kv_caches: dict[int, tuple[torch.Tensor, torch.Tensor]],  # global layer id -> (K, V)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]; normalised on the last stage
        x = self.model.embed_tokens(inputs) if self.is_first else inputs
        inv_freq = self._inv_freq_on_device(positions.device)
        cos, sin = rotary_cos_sin(positions, inv_freq, x.dtype)
        if (fused := _fused(x)) is not None:
            return self._forward_fused(fused, x, cos, sin, kv_caches, meta)
        for layer_id, layer in self.model.layers.items():
            x = layer(x, cos, sin, kv_caches[int(layer_id)], meta)
        return self.model.norm(x) if self.is_last else x

    def _forward_fused(self, fused, x, cos, sin, kv_caches, meta) -> torch.Tensor:
        pending = None  # the last MLP output, added to x inside the next RMSNorm
        for layer_id, layer in self.model.layers.items():
            x, pending = layer.forward_fused(fused, x, pending, cos, sin, kv_caches[int(layer_id)], meta)
        if not self.is_last:
            return x + pending
        return fused.add_rms_norm(x, pending, self.model.norm.weight, self.model.norm.eps)[1]

    def _inv_freq_on_device(self, device: torch.device) -> torch.Tensor:
        # Cached per device: a host-to-device copy inside a CUDA-graph capture is not allowed.
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq.to(device)
        return self._inv_freq_on[device]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] fp32
        assert self.is_last, "logits exist only on the last pipeline stage"
        return self.lm_head(hidden).float()
