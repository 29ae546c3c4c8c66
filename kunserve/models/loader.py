"""Weight loading: local directories or cached Hugging Face repos, safetensors or dummy weights.

Only the tensors a stage's layer range needs are read (a safetensors file is memory-mapped and
read tensor by tensor). Every failure names the tensor and the file so a corrupt checkpoint is
found at load time, not as wrong tokens later.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

# allocate(name, shape, dtype) -> tensor that will hold the parameter (a VMM view or torch.empty)
Allocator = Callable[[str, torch.Size, torch.dtype], torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or a file is damaged."""


def resolve_model_dir(model: str) -> Path:
    """A local directory, or a repo id looked up in the Hugging Face cache (never downloads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model path {model!r} is not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor in the Hugging Face cache. "
            f"Download it first (e.g. `hf download {model}` on a machine with network, then copy "
            f"the cache or set HF_HOME), or pass the path of a local checkpoint directory."
        ) from e


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{model_dir} has neither model.safetensors nor model.safetensors.index.json; "
            f"kunserve loads safetensors checkpoints (or use load_format='dummy')"
        )
    return {name: single for name in _read_header(single)}


def _read_header(path: Path) -> dict:
    """Parse a safetensors header and check that every tensor's bytes are inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, no safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated inside its header ({size} bytes)")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    for name, info in header.items():
        if info["data_offsets"][1] > data_bytes:
            raise CheckpointError(
                f"tensor {name!r} in {path} is truncated: its data ends at byte "
                f"{info['data_offsets'][1]} of the data section but the file holds {data_bytes}; "
                f"re-download the file"
            )
    return header


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def _default_allocator(device: torch.device) -> Allocator:
    return lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def load_safetensors(
    model: nn.Module, model_dir: Path, dtype: torch.dtype, device: torch.device,
    allocate: Allocator | None = None,
) -> None:
    """Fill every parameter of ``model`` (built on the meta device) from the checkpoint."""
    allocate = allocate or _default_allocator(device)
    files = _tensor_files(model_dir)
    checked: set[Path] = set()
    for name, param in list(model.named_parameters()):
        source = model.hf_weight_name(name)
        if source not in files:
            raise CheckpointError(
                f"tensor {source!r} (for parameter {name!r}) is missing from the checkpoint in "
                f"{model_dir}"
            )
        path = files[source]
        if path not in checked:
            _read_header(path)
            checked.add(path)
        with safe_open(str(path), framework="pt") as f:
            if source not in f.keys():
                raise CheckpointError(f"tensor {source!r} is missing from {path}")
            src = f.get_tensor(source)
        if src.shape != param.shape:
            raise CheckpointError(
                f"tensor {source!r} in {path} has shape {tuple(src.shape)} but the model config "
                f"expects {tuple(param.shape)}"
            )
        dest = allocate(name, param.shape, dtype)
        dest.copy_(src)
        _set_parameter(model, name, dest)


def load_dummy(
    model: nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0,
    allocate: Allocator | None = None,
) -> None:
    """Random weights from the config alone (``--load-format dummy``).

    Each tensor's values depend only on (seed, checkpoint name), so pipeline stages on different
    ranks build exactly the weights a single instance would.
    """
    allocate = allocate or _default_allocator(device)
    for name, param in list(model.named_parameters()):
        source = model.hf_weight_name(name)
        dest = allocate(name, param.shape, dtype)
        if source.endswith("norm.weight"):
            dest.fill_(1.0)
        else:
            gen = torch.Generator(device=dest.device).manual_seed(seed * 1_000_003 + zlib.crc32(source.encode()))
            values = torch.randn(param.shape, generator=gen, device=dest.device, dtype=torch.float32)
            dest.copy_(values.mul_(0.02))
        _set_parameter(model, name, dest)
