"""Model configuration read from a Hugging Face ``config.json``.

transformers 5 writes ``dtype`` and ``rope_parameters``; transformers 4 wrote ``torch_dtype``,
``rope_theta`` and ``rope_scaling``. ``ModelConfig.from_hf_dict`` accepts both so every
checkpoint on the Hub loads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a config/engine dtype name ("bfloat16", "torch.float32", ...) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@attrs.frozen
class RopeConfig:
    """Rotary embedding parameters; ``rope_type`` is "default" or "llama3"."""

    theta: float
    rope_type: str = attrs.field(default="default")
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @rope_type.validator
    def _check_type(self, _attr, value):
        if value not in ("default", "llama3"):
            raise ValueError(
                f"rope_type {value!r} is not supported; kunserve supports 'default' and 'llama3'"
            )


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    params = dict(d.get("rope_parameters") or {})
    legacy_scaling = d.get("rope_scaling") or {}
    params = {**legacy_scaling, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kwargs = {
        k: params[k]
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k in params
    }
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def _sliding_window_per_layer(d: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Window size (tokens) per layer, None for full attention.

    Mistral applies ``sliding_window`` to every layer; Qwen2/Qwen3 only when
    ``use_sliding_window`` is set, and then per ``layer_types`` (transformers 5) or for layers
    at index >= ``max_window_layers`` (transformers 4).
    """
    window = d.get("sliding_window")
    if not window:
        return (None,) * num_layers
    if "use_sliding_window" in d and not d["use_sliding_window"]:
        return (None,) * num_layers
    layer_types = d.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if "max_window_layers" in d:
        first = d["max_window_layers"]
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers


@attrs.frozen
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: tuple[int | None, ...] = ()
    dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"

    def __attrs_post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot pick a model class")
        num_layers = d["num_hidden_layers"]
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        arch = archs[0]
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope=_rope_from_hf(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and writes no attention_bias key.
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window_per_layer(d, num_layers),
            dtype=parse_dtype(d.get("dtype") or d.get("torch_dtype") or "float32"),
            eos_token_ids=eos_ids,
            hidden_act=d.get("hidden_act", "silu"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory needs a config.json")
        return cls.from_hf_dict(json.loads(path.read_text()))
