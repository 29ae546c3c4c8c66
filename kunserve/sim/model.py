"""Model shapes for the simulator: bytes, FLOPs and KV size from a config dict.

Shapes come from the same config dicts the benchmarks use (``kunserve/bench/_model_configs.py``:
``qwen2.5-14b``, ``qwen2.5-72b``, ``llama3-8b``) or from a model directory's ``config.json``
(e.g. the built-in tiny model, for validation against real CPU runs), parsed by the engine's own
``ModelConfig.from_hf_dict``. Parameter tensors are listed as the engine's Llama-family module
builds them (``kunserve/models/llama.py``), so weight bytes match what the engine allocates.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from kunserve.models.config import ModelConfig
from kunserve.policy.drop import WeightLayout

_TENSOR_ALIGN = 256  # runtime/placement.py packs each tensor of a unit at a 256-byte offset


def load_model_config(name_or_dir: str) -> tuple[str, ModelConfig]:
    """(display name, config) of a built-in shape or a directory holding config.json."""
    from kunserve.bench._model_configs import MODEL_CONFIGS

    if name_or_dir in MODEL_CONFIGS:
        return name_or_dir, ModelConfig.from_hf_dict(MODEL_CONFIGS[name_or_dir])
    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path.name, ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    raise ValueError(f"unknown model {name_or_dir!r}: use one of {sorted(MODEL_CONFIGS)} or a directory "
                     f"with a config.json")


def _layer_tensors(c: ModelConfig) -> list[int]:
    """Element counts of one decoder layer's parameters (see models/llama.py)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    bias = c.attention_bias
    o_bias = bias and c.architecture != "Qwen2ForCausalLM"
    tensors = [c.hidden_size * q, c.hidden_size * kv, c.hidden_size * kv, q * c.hidden_size]
    tensors += [q, kv, kv] if bias else []
    tensors += [c.hidden_size] if o_bias else []
    tensors += [c.hidden_size * c.intermediate_size] * 3
    tensors += [c.intermediate_size] * 2 + [c.hidden_size] if c.mlp_bias else []
    tensors += [c.hidden_size, c.hidden_size]  # input and post-attention RMSNorm
    tensors += [c.head_dim, c.head_dim] if c.qk_norm else []
    return tensors


@attrs.frozen
class ModelShape:
    """What the simulator needs of a model. ``tp`` splits nothing here: bytes and FLOPs are for
    the whole model (one instance); the roofline divides by the instance's GPU count."""

    name: str
    config: ModelConfig

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def dtype_bytes(self) -> int:
        return self.config.dtype.itemsize

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def layer_params(self) -> int:
        return sum(_layer_tensors(self.config))

    @property
    def embed_params(self) -> int:
        return self.config.vocab_size * self.config.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm + lm_head (the lm_head is the embedding when tied)."""
        lm_head = 0 if self.config.tie_word_embeddings else self.config.vocab_size * self.config.hidden_size
        return lm_head + self.config.hidden_size

    @property
    def weight_bytes(self) -> int:
        return (self.num_layers * self.layer_params + self.embed_params + self.head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return self.config.kv_bytes_per_token_per_layer

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.num_layers

    def block_bytes(self, block_size: int, num_layers: int | None = None) -> int:
        """KV bytes of one block holding ``num_layers`` layers (default all)."""
        return block_size * self.kv_bytes_per_token_layer * (self.num_layers if num_layers is None else num_layers)

    def weight_layout(self, granularity: int = 1) -> WeightLayout:
        """Bytes each weight unit frees when dropped, as ``runtime.drop_controller.weight_layout_of``
        sees them: per-tensor 256-byte packing, each unit rounded up to the allocator granularity
        (host memfd: 4 KiB; CUDA VMM: 2 MiB). A tied lm_head is the embedding, so it frees nothing
        beyond the final norm."""
        d = self.dtype_bytes

        def unit(counts: list[int]) -> int:
            packed = sum(-(-n * d // _TENSOR_ALIGN) * _TENSOR_ALIGN for n in counts)
            return -(-packed // granularity) * granularity

        layer = unit(_layer_tensors(self.config))
        head = [self.config.hidden_size] + ([] if self.config.tie_word_embeddings else [self.embed_params])
        return WeightLayout((layer,) * self.num_layers, unit([self.embed_params]), unit(head))

    def slice_fraction(self, layers: tuple[int, int]) -> float:
        """Share of the per-token compute in a stage holding ``layers``."""
        return (layers[1] - layers[0]) / self.num_layers

    def params_per_token_flops(self) -> float:
        """Linear-layer FLOPs of one token through every layer (2 per weight)."""
        return 2.0 * self.num_layers * self.layer_params


def resolve(name_or_dir: str) -> ModelShape:
    name, config = load_model_config(name_or_dir)
    return ModelShape(name, config)


def describe(shape: ModelShape) -> str:
    return (f"{shape.name}: {shape.num_layers} layers, {shape.weight_bytes / 1e9:.2f} GB of weights, "
            f"{shape.kv_bytes_per_token / 1024:.0f} KiB of KV per token")
