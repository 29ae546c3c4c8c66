"""Where a model's weights live inside the unified memory: one slot per weight unit.

A *unit* is what can be dropped on its own: a decoder layer (key = its global layer id), the
embedding (``"embed"``) and the final norm with the lm_head (``"head"``). Each unit's tensors
are packed into one slot (its own physical chunk), each tensor at a 256-byte aligned offset.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from kunserve.runtime.vmm import UnifiedMemory

_ALIGN = 256
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def weight_unit(param_name: str) -> int | str:
    match = _LAYER.match(param_name)
    if match:
        return int(match.group(1))
    return "embed" if param_name.startswith("model.embed_tokens.") else "head"


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class WeightPlacement:
    """Packs the parameters of a meta-device model into per-unit slots of ``memory``.

    Invariant: ``offsets[name]`` is the byte offset of parameter ``name`` inside the slot of
    ``weight_unit(name)``; ``unit_bytes[unit]`` is that slot's size.
    """

    def __init__(self, memory: UnifiedMemory, model: nn.Module, dtype: torch.dtype):
        self.memory = memory
        self.dtype = dtype
        self.offsets: dict[str, int] = {}
        self.unit_bytes: dict[int | str, int] = {}
        for name, param in model.named_parameters():
            unit = weight_unit(name)
            self.offsets[name] = self.unit_bytes.get(unit, 0)
            self.unit_bytes[unit] = self.offsets[name] + _align(math.prod(param.shape) * dtype.itemsize)
        for unit, nbytes in self.unit_bytes.items():
            memory.place_layer(unit, nbytes)

    def allocate(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The loader's allocator: a zero-copy view of the parameter's place."""
        assert dtype == self.dtype, f"{name}: placed as {self.dtype}, asked for {dtype}"
        return self.memory.layer_view(weight_unit(name), self.offsets[name], shape, dtype)
