"""The grid of batches ``python -m kunserve.profile`` measures to fit the cost models (issue 7).

Shapes only, no tensors: the simulator fits its synthetic profile over the same grid
(``kunserve.sim.timing.synthetic_profile``). Every batch stays within ``GridSpec.max_context``
tokens per request and ``max_batch_tokens`` per batch; the kinds:

  sweep    prefill of T tokens in sequences of <= 128 (attention negligible), T = 16 .. max on a
           geometric ladder: the throughput curve MIN tokens is read from;
  prefill  1-8 fresh prompts;
  decode   1-``max_seqs`` one-token chunks over long contexts;
  mixed    decodes plus 1-3 prefill chunks (some with a prefix);
  chunked  1-3 chunks of prompts with a large prefix.

A batch is a list of ``(prefix, num_tokens)`` chunks.
"""

from __future__ import annotations

import math
import random

import attrs

from kunserve.policy.cost_model import BatchSample

KINDS = ("sweep", "prefill", "decode", "mixed", "chunked")
_SWEEP_SEQ_TOKENS = 128  # sweep sequences are this short so attention stays a small share


@attrs.frozen
class GridSpec:
    """Bounds of the profiled batches, validated once."""

    max_context: int  # tokens of one request after its chunk (prefix + chunk)
    max_batch_tokens: int  # new tokens of one batch
    max_seqs: int  # chunks of one batch
    kv_tokens: int  # Σ context of one batch, rounded up to blocks, must fit the KV cache
    block_size: int = 16

    def __attrs_post_init__(self) -> None:
        for name in ("max_context", "max_batch_tokens", "max_seqs", "kv_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context < 64 or self.max_batch_tokens < 32:
            raise ValueError(f"need max_context >= 64 and max_batch_tokens >= 32, got "
                             f"{self.max_context} and {self.max_batch_tokens}")
        if self.kv_tokens < self.max_context + self.block_size:
            raise ValueError(f"the KV cache ({self.kv_tokens} tokens) must hold one max_context "
                             f"({self.max_context}) request")

    def kv_blocks(self, chunks) -> int:
        return sum(-(-(p + c) // self.block_size) for p, c in chunks)

    def fits(self, chunks) -> bool:
        return (self.kv_blocks(chunks) * self.block_size <= self.kv_tokens
                and all(p + c <= self.max_context for p, c in chunks)
                and sum(c for _, c in chunks) <= self.max_batch_tokens and len(chunks) <= self.max_seqs)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    lo, hi = max(1, lo), max(1, hi)
    if hi <= lo:
        return lo
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def _split_tokens(rng: random.Random, total: int, parts: int, cap: int) -> list[int]:
    """``parts`` random positive sizes summing to ``total``, each at most ``cap``."""
    parts = max(1, min(parts, total))
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    return [min(s, cap) for s in sizes]


def sweep_batches(spec: GridSpec) -> list[list[tuple[int, int]]]:
    """Prefill of T tokens in sequences of <= 128, T on a 1x / 1.5x power-of-two ladder."""
    sizes, t = [], 16
    while t <= spec.max_batch_tokens:
        sizes += [t] + ([t * 3 // 2] if t * 3 // 2 <= spec.max_batch_tokens else [])
        t *= 2
    out = []
    for total in sizes:
        full, rest = divmod(total, _SWEEP_SEQ_TOKENS)
        chunks = [(0, _SWEEP_SEQ_TOKENS)] * full + ([(0, rest)] if rest else [])
        if spec.fits(chunks):
            out.append(chunks)
    return out


def _prefill(rng: random.Random, spec: GridSpec) -> list[tuple[int, int]]:
    k = rng.randint(1, min(8, spec.max_seqs))
    total = _log_uniform(rng, 16 * k, min(spec.max_batch_tokens, k * spec.max_context))
    return [(0, c) for c in _split_tokens(rng, total, k, spec.max_context)]


def _decode(rng: random.Random, spec: GridSpec) -> list[tuple[int, int]]:
    k = _log_uniform(rng, 1, min(spec.max_seqs, spec.max_batch_tokens))
    top = spec.max_context - 1
    if rng.random() < 0.5:  # half the batches: every context in the top 7/8
        return [(rng.randint(spec.max_context // 8, top), 1) for _ in range(k)]
    return [(_log_uniform(rng, 16, top), 1) for _ in range(k)]


def _mixed(rng: random.Random, spec: GridSpec) -> list[tuple[int, int]]:
    k = _log_uniform(rng, 1, min(128, spec.max_seqs - 3, spec.max_batch_tokens // 2))
    chunks = [(_log_uniform(rng, 16, spec.max_context - 1), 1) for _ in range(k)]
    room = spec.max_batch_tokens - k
    total = _log_uniform(rng, 16, min(room, 3 * spec.max_context // 2))
    for c in _split_tokens(rng, total, rng.randint(1, 3), spec.max_context // 2):
        prefix = 0 if rng.random() < 0.5 else rng.randint(0, spec.max_context - c)
        chunks.append((prefix, c))
    return chunks


def _chunked(rng: random.Random, spec: GridSpec) -> list[tuple[int, int]]:
    n = rng.randint(1, 3)
    out = []
    for _ in range(n):
        c = _log_uniform(rng, 16, min(spec.max_batch_tokens // n, spec.max_context // 2))
        out.append((rng.randint(spec.max_context // 4, spec.max_context - c), c))
    return out


_GENERATORS = {"prefill": _prefill, "decode": _decode, "mixed": _mixed, "chunked": _chunked}


def _shrink_to_fit(chunks: list[tuple[int, int]], spec: GridSpec) -> list[tuple[int, int]]:
    """Drop chunks from the front (decodes come first) until the batch fits the KV cache."""
    while len(chunks) > 1 and not spec.fits(chunks):
        chunks = chunks[1:]
    return chunks


def make_grid(spec: GridSpec, num_random: int, seed: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """(kind, [(prefix, tokens), ...]) for the sweep plus ``num_random`` random batches spread
    evenly over the other kinds, in a shuffled measuring order (drift hits every kind alike)."""
    rng = random.Random(seed)
    grid = [("sweep", chunks) for chunks in sweep_batches(spec)]
    kinds = list(_GENERATORS)
    for i in range(num_random):
        kind = kinds[i % len(kinds)]
        chunks = _shrink_to_fit(_GENERATORS[kind](rng, spec), spec)
        if spec.fits(chunks):
            grid.append((kind, chunks))
    rng.shuffle(grid)
    return grid


def min_tokens_from_sweep(samples: list[BatchSample], fraction: float) -> int:
    """The smallest sweep size whose throughput reaches ``fraction`` of the best one's."""
    sweep = sorted((s.num_tokens, s.num_tokens / s.seconds) for s in samples if s.kind == "sweep")
    if not sweep:
        raise ValueError("no sweep samples were measured; MIN tokens cannot be derived")
    best = max(rate for _, rate in sweep)
    return next(tokens for tokens, rate in sweep if rate >= fraction * best)
