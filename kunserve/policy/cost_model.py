"""Forward-pass cost models fitted from profiled batches (issue 7): the lookahead batcher's
yardstick and the simulator's clock.

``CostModel``: a chunk of ``c`` new tokens over ``p`` tokens already in the KV cache costs
``a·c·p + b·c² + f·c + d + g·p`` (prefix attention, self attention, per-token work, per-chunk
work, one read of the prefix KV; ``g = 0`` is the paper's form); a micro-batch of ``k`` chunks
(``T`` new tokens, longest context ``C``) costs

    Σ chunk costs − (k − 1)·λ
      + floor·max(0, 1 − T / knee_tokens)               the weight-read floor (roofline knee)
      + max(0, h·C − Σ (a·c·p + b·c² + g·p))            the longest context, if some chunk has c > 1

Invariants the batcher relies on, enforced here: ``λ ≤ d`` and ``floor / knee_tokens ≤ f``, so a
batch's cost never falls as chunks or tokens are added. ``TokenLinearModel`` (``α·Σc + β``) is
the paper's token-count baseline. Why each term, how the maxima are fitted inside least squares
(``kunserve.policy.cost_fit``) and the measured limits: docs/design-lookahead.md, "Cost model".

Decision-time code needs neither torch nor CUDA; fitting uses numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import attrs
import numpy as np

from kunserve.policy.cost_fit import fit_batch_terms, knee_candidates, nnls


def _non_negative_int(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be an int >= 0, got {value!r}")


def _positive_int(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _non_negative_float(instance, attribute, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class ChunkWork:
    """``num_tokens`` new tokens of request ``request_id``, whose first ``prefix`` tokens are
    already in the KV cache (positions ``[prefix, prefix + num_tokens)`` are computed)."""

    request_id: str
    prefix: int = attrs.field(validator=_non_negative_int)
    num_tokens: int = attrs.field(validator=_positive_int)

    @property
    def end(self) -> int:
        """The request's computed-token count once this chunk has run."""
        return self.prefix + self.num_tokens


@attrs.frozen
class BatchSample:
    """One profiled forward pass: the chunks it ran and its measured time."""

    chunks: tuple[ChunkWork, ...] = attrs.field(converter=tuple)
    seconds: float = attrs.field()
    kind: str = "batch"  # what the profiler was measuring (prefill, decode, ...): reporting only

    @chunks.validator
    def _check_chunks(self, attribute, value) -> None:
        if not value:
            raise ValueError("a sample needs at least one chunk")

    @seconds.validator
    def _check_seconds(self, attribute, value) -> None:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"seconds must be a finite number > 0, got {value!r}")

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def to_dict(self) -> dict:
        return {"chunks": [[c.prefix, c.num_tokens] for c in self.chunks], "seconds": self.seconds,
                "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict) -> "BatchSample":
        chunks = [ChunkWork(str(i), int(p), int(c)) for i, (p, c) in enumerate(data["chunks"])]
        return cls(chunks, float(data["seconds"]), data.get("kind", "batch"))


def as_sample(sample) -> BatchSample:
    """A ``BatchSample``, or a ``(chunks, seconds)`` pair."""
    if isinstance(sample, BatchSample):
        return sample
    chunks, seconds = sample
    return BatchSample(chunks, seconds)


# -- the models ------------------------------------------------------------------------------
@attrs.frozen
class BatchShape:
    """What a batch's cost depends on, gathered over its chunks by ``CostModel.shape``; the
    shapes of two disjoint sets of chunks join with ``+`` (the batcher prices a cut from the
    shapes of the chunks either side of it)."""

    total: float = 0.0  # Σ chunk_cost
    attention: float = 0.0  # Σ a·c·p + b·c² + g·p: the attention kernels' work (0 if h = 0: unused)
    chunks: int = 0
    tokens: int = 0
    max_context: int = 0  # max over chunks of p + c
    multi: bool = False  # some chunk has > 1 token: the batch runs the prefill attention kernel

    def __add__(self, other: "BatchShape") -> "BatchShape":
        return BatchShape(self.total + other.total, self.attention + other.attention,
                          self.chunks + other.chunks, self.tokens + other.tokens,
                          max(self.max_context, other.max_context), self.multi or other.multi)


class _FittedModel:
    """What both fitted models share: their error on samples and their JSON files (the model's
    own dict, or a profile holding it under ``PROFILE_KEY``). Needs ``batch_cost``, ``to_dict``
    and ``from_dict(data, source, where)``."""

    __slots__ = ()
    PROFILE_KEY: str

    def mean_relative_error(self, samples: Iterable) -> float:
        return mean_relative_error(self.batch_cost, samples)

    def to_json(self, path: str | Path) -> None:
        _write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path):
        """A file holding the model itself, or a profile (``python -m kunserve.profile``)."""
        data = _read_json(path)
        where = f"{cls.PROFILE_KEY}." if cls.PROFILE_KEY in data else ""
        return cls.from_dict(data.get(cls.PROFILE_KEY, data), str(path), where)


@attrs.frozen
class CostModel(_FittedModel):
    """Seconds of one forward pass; see the module docstring for the terms."""

    a: float = attrs.field(validator=_non_negative_float)  # per query x prefix token
    b: float = attrs.field(validator=_non_negative_float)  # per query x chunk token
    f: float = attrs.field(validator=_non_negative_float)  # per token
    d: float = attrs.field(validator=_non_negative_float)  # per chunk
    lam: float = attrs.field(validator=_non_negative_float)  # shared by a batch's chunks
    g: float = attrs.field(default=0.0, validator=_non_negative_float)  # per prefix token (KV read)
    floor: float = attrs.field(default=0.0, validator=_non_negative_float)  # weight read, per batch
    knee_tokens: int = attrs.field(default=1, validator=_positive_int)  # where the GEMMs reach it
    h: float = attrs.field(default=0.0, validator=_non_negative_float)  # per longest-context token

    def __attrs_post_init__(self) -> None:
        if self.lam > self.d:
            raise ValueError(f"lam ({self.lam}) must be <= d ({self.d}): otherwise adding a chunk "
                             f"to a batch would lower its cost")
        if self.floor > self.f * self.knee_tokens:
            raise ValueError(f"floor ({self.floor}) must be <= f * knee_tokens ({self.f * self.knee_tokens}): "
                             f"otherwise adding a token below the knee would lower a batch's cost")

    KEYS = ("a", "b", "f", "d", "lambda")  # required in JSON; "g", "floor" (+ "knee_tokens"), "h" optional
    PROFILE_KEY = "cost_model"

    def chunk_attention(self, chunk: ChunkWork) -> float:
        """The attention part of ``chunk_cost`` (what the context term is compared with)."""
        c, p = chunk.num_tokens, chunk.prefix
        return self.a * c * p + self.b * c * c + self.g * p

    def chunk_cost(self, chunk: ChunkWork) -> float:
        c, p = chunk.num_tokens, chunk.prefix
        return self.a * c * p + self.b * c * c + self.f * c + self.d + self.g * p

    def chunk_shape(self, chunk: ChunkWork) -> BatchShape:
        """``shape((chunk,))`` without the loop (the batcher prices many one-chunk pieces)."""
        c = chunk.num_tokens
        return BatchShape(self.chunk_cost(chunk), self.chunk_attention(chunk) if self.h else 0.0, 1, c,
                          chunk.end, c > 1)

    def shape(self, chunks: Iterable[ChunkWork]) -> BatchShape:
        total = attention = 0.0
        k = tokens = max_context = 0
        multi = False
        for chunk in chunks:
            total += self.chunk_cost(chunk)
            if self.h:  # only the context term reads it
                attention += self.chunk_attention(chunk)
            k += 1
            tokens += chunk.num_tokens
            max_context = max(max_context, chunk.end)
            multi = multi or chunk.num_tokens > 1
        return BatchShape(total, attention, k, tokens, max_context, multi)

    def shape_cost(self, shape: BatchShape) -> float:
        """Seconds of a batch of this shape. Every term is non-decreasing as chunks or tokens are
        added (λ ≤ d, floor / knee_tokens ≤ f, the maxima of non-decreasing terms), which is
        what the lookahead batcher's cut search relies on."""
        if not shape.chunks:
            return 0.0
        cost = shape.total - (shape.chunks - 1) * self.lam
        if self.floor:  # the GEMMs wait for the weights below the knee
            cost += self.floor * max(0.0, 1.0 - shape.tokens / self.knee_tokens)
        if self.h and shape.multi:  # the prefill kernel lasts at least its longest program
            cost += max(0.0, self.h * shape.max_context - shape.attention)
        return cost

    def batch_cost(self, chunks: Iterable[ChunkWork]) -> float:
        return self.shape_cost(self.shape(chunks))

    @staticmethod
    def features(chunks: Sequence[ChunkWork]) -> list[float]:
        """Columns of the fit: (Σcp, Σc², Σc, k, 1, Σp) for coefficients (a, b, f, d − λ, λ, g)."""
        cp = sum(c.num_tokens * c.prefix for c in chunks)
        cc = sum(c.num_tokens * c.num_tokens for c in chunks)
        return [float(cp), float(cc), float(sum(c.num_tokens for c in chunks)), float(len(chunks)), 1.0,
                float(sum(c.prefix for c in chunks))]

    @classmethod
    def fit(cls, samples: Iterable, *, prefix_read: bool = True, floor: bool = False,
            context: bool = False) -> "CostModel":
        """Least squares over ``samples``; ``prefix_read=False`` fits the paper's form (g = 0);
        ``floor`` and ``context`` add the weight-read floor and the longest-context term (off by
        default: the additive model is then the one plain solve it always was)."""
        if not floor and not context:
            columns = cls.features if prefix_read else (lambda chunks: cls.features(chunks)[:5])
            a, b, f, e, lam, *g = _fit_relative(columns, samples)
            return cls(a, b, f, e + lam, lam, g[0] if g else 0.0)
        samples = [as_sample(s) for s in samples]
        knees = knee_candidates([s.num_tokens for s in samples]) if floor else [None]
        fits = [(fit_batch_terms(samples, prefix_read, knee, context), knee) for knee in knees]
        (w, _error), knee = min(fits, key=lambda fitted: fitted[0][1])
        return _batch_terms_model(w, prefix_read, knee, context)

    def to_dict(self) -> dict:
        return {"form": "a*c*p + b*c^2 + f*c + d + g*p per chunk, minus (k-1)*lambda per batch, plus "
                        "floor*max(0, 1 - T/knee_tokens) (T = batch tokens), plus max(0, h*C - attention) "
                        "(C = longest p + c, attention = sum of a*c*p + b*c^2 + g*p) if a chunk has > 1 "
                        "token; seconds",
                "a": self.a, "b": self.b, "f": self.f, "d": self.d, "lambda": self.lam, "g": self.g,
                "floor": self.floor, "knee_tokens": self.knee_tokens, "h": self.h}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", where: str = "") -> "CostModel":
        a, b, f, d, lam = _numbers(data, cls.KEYS, source, where)
        g, floor, h = (_numbers(data, (key,), source, where)[0] if key in data else 0.0
                       for key in ("g", "floor", "h"))
        knee = 1
        if floor or "knee_tokens" in data:  # a floor needs its knee; without one it is unused
            (knee,) = _numbers(data, ("knee_tokens",), source, where)
            if knee != int(knee) or knee < 1:
                raise ValueError(f"{source}: key {where + 'knee_tokens'!r} must be an int >= 1, got {knee!r}")
        return _construct(cls, source, where, a, b, f, d, lam, g, floor, int(knee), h)


@attrs.frozen
class TokenLinearModel(_FittedModel):
    """Seconds of one forward pass as ``alpha`` per token plus ``beta`` per batch."""

    alpha: float = attrs.field(validator=_non_negative_float)
    beta: float = attrs.field(validator=_non_negative_float)

    KEYS = ("alpha", "beta")
    PROFILE_KEY = "token_linear"

    def chunk_cost(self, chunk: ChunkWork) -> float:
        return self.alpha * chunk.num_tokens

    def batch_cost(self, chunks: Iterable[ChunkWork]) -> float:
        chunks = list(chunks)
        return self.alpha * sum(c.num_tokens for c in chunks) + self.beta if chunks else 0.0

    @staticmethod
    def features(chunks: Sequence[ChunkWork]) -> list[float]:
        return [float(sum(c.num_tokens for c in chunks)), 1.0]

    @classmethod
    def fit(cls, samples: Iterable) -> "TokenLinearModel":
        return cls(*_fit_relative(cls.features, samples))

    def to_dict(self) -> dict:
        return {"form": "alpha*sum(c) + beta; seconds", "alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", where: str = "") -> "TokenLinearModel":
        return _construct(cls, source, where, *_numbers(data, cls.KEYS, source, where))


@attrs.frozen
class Profile:
    """What ``python -m kunserve.profile`` writes: the fitted models and MIN tokens."""

    cost_model: CostModel
    token_linear: TokenLinearModel
    min_tokens: int = attrs.field(validator=_positive_int)
    device: str = "unknown"
    model: str = "unknown"

    @classmethod
    def from_json(cls, path: str | Path, section: str | None = None) -> "Profile":
        """The profile's top-level models (fitted on the batcher's operating range), or those
        of ``section``: "whole_grid" holds the fit on every profiled batch, the better step
        clock for small decode-only batches (a simulator's); MIN tokens is always top-level."""
        data, source = _read_json(path), str(path)
        models, where = data, ""
        if section is not None:
            if section not in data:
                raise ValueError(f"{source}: missing key {section!r}")
            models, where = _mapping(data, section, source), section + "."
        for key in ("cost_model", "token_linear"):
            if key not in models:
                raise ValueError(f"{source}: missing key {where + key!r}")
        if "min_tokens" not in data:
            raise ValueError(f"{source}: missing key 'min_tokens'")
        (min_tokens,) = _numbers(data, ("min_tokens",), source, "")
        if min_tokens != int(min_tokens) or min_tokens < 1:
            raise ValueError(f"{source}: key 'min_tokens' must be an int >= 1, got {data['min_tokens']!r}")
        return cls(
            CostModel.from_dict(_mapping(models, "cost_model", source), source, where + "cost_model."),
            TokenLinearModel.from_dict(_mapping(models, "token_linear", source), source, where + "token_linear."),
            int(min_tokens), str(data.get("device", "unknown")), str(data.get("model", "unknown")),
        )


# -- fitting and scoring ----------------------------------------------------------------------
def mean_relative_error(predict, samples: Iterable) -> float:
    """Mean of |predicted − measured| / measured over ``samples``."""
    samples = [as_sample(s) for s in samples]
    if not samples:
        raise ValueError("need at least one sample to score a model")
    return sum(abs(predict(s.chunks) - s.seconds) / s.seconds for s in samples) / len(samples)


def _fit_relative(features, samples: Iterable) -> list[float]:
    """Non-negative least squares of Σ_i ((x_i·w − y_i) / y_i)² over the samples."""
    samples = [as_sample(s) for s in samples]
    x = np.array([features(s.chunks) for s in samples], dtype=np.float64)  # [n, m]
    y = np.array([s.seconds for s in samples], dtype=np.float64)  # [n]
    if x.shape[0] < x.shape[1]:
        raise ValueError(f"need at least {x.shape[1]} samples to fit {x.shape[1]} coefficients, "
                         f"got {x.shape[0]}")
    return [float(w) for w in nnls(x / y[:, None], np.ones_like(y))]


def _batch_terms_model(w: np.ndarray, prefix_read: bool, knee: int | None, context: bool) -> CostModel:
    """Coefficients (a, b, f − u, d − λ, λ[, g][, u][, h]) as a ``CostModel``."""
    a, b, f_rest, e, lam, *rest = (float(v) for v in w)
    g = rest.pop(0) if prefix_read else 0.0
    u = rest.pop(0) if knee else 0.0
    h = rest.pop(0) if context else 0.0
    # f = (f − u) + u and floor = u·knee, so floor <= f·knee holds exactly in floating point too
    return CostModel(a, b, f_rest + u, e + lam, lam, g, floor=u * knee if knee else 0.0,
                     knee_tokens=knee or 1, h=h)


def _read_json(path: str | Path) -> dict:
    text = Path(path).read_text()  # a missing file raises FileNotFoundError, naming it
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _mapping(data: dict, key: str, source: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        raise ValueError(f"{source}: key {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def _numbers(data: dict, keys: Sequence[str], source: str, where: str) -> list[float]:
    values = []
    for key in keys:
        if key not in data:
            raise ValueError(f"{source}: missing key {where + key!r}")
        value = data[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{source}: key {where + key!r} must be a finite number, got {value!r}")
        values.append(value)
    return values


def _construct(cls, source: str, where: str, *values):
    try:
        return cls(*values)
    except ValueError as e:
        raise ValueError(f"{source}: {where or ''}{e}") from e
