"""Per-request sampling parameters, with vLLM's field names and defaults."""

from __future__ import annotations

import attrs


def _at_least(minimum):
    def check(_inst, attr, value):
        if value < minimum:
            raise ValueError(f"{attr.name} must be at least {minimum}, got {value}")
    return check


def _as_tuple(value):
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy; ``top_k`` of 0 or -1 disables it.

    Invariant: every field is validated at construction; a bad value raises ValueError naming
    the field and what to change.
    """

    n: int = attrs.field(default=1)
    temperature: float = attrs.field(default=1.0)
    top_p: float = attrs.field(default=1.0)
    top_k: int = attrs.field(default=0)
    seed: int | None = None
    max_tokens: int | None = attrs.field(default=16)
    stop: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_as_tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @n.validator
    def _check_n(self, _attr, value):
        if value != 1:
            raise ValueError(f"n={value} is not supported yet; send n separate requests instead")

    @temperature.validator
    def _check_temperature(self, _attr, value):
        if value < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {value}")

    @top_p.validator
    def _check_top_p(self, _attr, value):
        if not 0 < value <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {value}")

    @top_k.validator
    def _check_top_k(self, _attr, value):
        if value < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive count, got {value}")

    @max_tokens.validator
    def _check_max_tokens(self, _attr, value):
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be at least 1, got {value}")

    @stop.validator
    def _check_stop(self, _attr, value):
        if any(not isinstance(s, str) or not s for s in value):
            raise ValueError(f"stop must be non-empty strings, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
