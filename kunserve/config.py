"""Engine configuration: every user-facing knob, validated once at construction."""

from __future__ import annotations

import attrs


def _positive(_inst, attr, value):
    if value is not None and value < 1:
        raise ValueError(f"{attr.name} must be a positive integer, got {value}")


@attrs.frozen(kw_only=True)
class EngineConfig:
    """Arguments of ``kunserve.LLM`` / ``LLMEngine``, named as vLLM's engine arguments.

    KV capacity: ``num_kv_blocks`` if given, else ``kv_cache_memory_bytes`` (default: 1 GiB on
    CPU) divided by the bytes of one block, capped at what ``max_num_seqs`` full-length requests
    could ever use. ``memory="auto"`` uses the unified VMM allocator when the device has one
    (always on CPU; on CUDA with cuda-bindings installed).
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = attrs.field(default="auto")
    memory: str = attrs.field(default="auto")
    seed: int = 0
    block_size: int = attrs.field(default=16, validator=_positive)
    num_kv_blocks: int | None = attrs.field(default=None, validator=_positive)
    kv_cache_memory_bytes: int | None = attrs.field(default=None, validator=_positive)
    max_model_len: int | None = attrs.field(default=None, validator=_positive)
    max_num_seqs: int = attrs.field(default=256, validator=_positive)
    max_num_batched_tokens: int = attrs.field(default=2048, validator=_positive)
    enforce_eager: bool = False  # CUDA: never replay decode steps from CUDA graphs
    # Preemption: "recompute" (vLLM v1) or "swap" (victim's KV to a host swap space and back,
    # docs/policy-swap.md). Swap space and per-step swap-in budget in bytes (swap mode only).
    preemption_mode: str = attrs.field(default="recompute")
    swap_space_bytes: int = attrs.field(default=4 << 30, validator=_positive)
    swap_bytes_per_step: int = attrs.field(default=512 << 20, validator=_positive)
    # Pipeline stage: build only layers [first, last) (None: the whole model).
    layer_range: tuple[int, int] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))

    @load_format.validator
    def _check_load_format(self, _attr, value):
        if value not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {value!r}")

    @memory.validator
    def _check_memory(self, _attr, value):
        if value not in ("auto", "vmm", "torch"):
            raise ValueError(
                f"memory must be 'auto', 'vmm' (unified allocator: weights can be dropped into the "
                f"KV cache) or 'torch' (plain tensors), got {value!r}"
            )

    @preemption_mode.validator
    def _check_preemption_mode(self, _attr, value):
        if value not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {value!r}")
        if value == "swap" and self.layer_range is not None:
            raise ValueError("preemption_mode='swap' needs a whole-model instance (layer_range=None): "
                             "pipeline stages cannot swap (use recompute preemption)")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; accepted: {sorted(known - {'model'})}")
        return cls(model=model, **kwargs)
