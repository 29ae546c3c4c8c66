"""Model classes keyed by the ``architectures`` entry of config.json."""

from __future__ import annotations

from typing import Callable

from torch import nn

from kunserve.models.config import ModelConfig
from kunserve.models.llama import LlamaForCausalLM

ModelFactory = Callable[[ModelConfig, "tuple[int, int] | None"], nn.Module]

_REGISTRY: dict[str, ModelFactory] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def register_model(architecture: str, factory: ModelFactory) -> None:
    """Add a model class (``factory(config, layer_range)``) for an architecture name."""
    _REGISTRY[architecture] = factory


def build_model(cfg: ModelConfig, layer_range: tuple[int, int] | None = None) -> nn.Module:
    if cfg.architecture not in _REGISTRY:
        raise ValueError(
            f"architecture {cfg.architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    return _REGISTRY[cfg.architecture](cfg, layer_range)
