"""Hugging Face decoder architectures, built for a layer range, with their loaders."""

from kunserve.models.config import ModelConfig, RopeConfig, parse_dtype
from kunserve.models.loader import CheckpointError, load_dummy, load_safetensors, resolve_model_dir
from kunserve.models.registry import build_model, register_model, supported_architectures

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "RopeConfig",
    "build_model",
    "load_dummy",
    "load_safetensors",
    "parse_dtype",
    "register_model",
    "resolve_model_dir",
    "supported_architectures",
]
