"""Fitting and scoring a profile's models (``python -m kunserve.profile``, also ``--refit``): a
held-out split of each kind of batch, the models fitted on the rest, their errors by kind and
token range, and MIN tokens. Shapes and times only, no tensors."""

from __future__ import annotations

import random

from kunserve.policy.cost_model import BatchSample, CostModel, TokenLinearModel
from kunserve.policy.profile_grid import KINDS, min_tokens_from_sweep


def split_samples(samples: list[BatchSample], train_fraction: float, seed: int):
    """(train, held_out): ``train_fraction`` of each kind (at least one each side if possible)."""
    rng = random.Random(seed + 1)
    train, held = [], []
    for kind in KINDS:
        group = [s for s in samples if s.kind == kind]
        rng.shuffle(group)
        n = round(len(group) * train_fraction)
        if len(group) >= 2:
            n = min(max(n, 1), len(group) - 1)
        train += group[:n]
        held += group[n:]
    return train, held


def score(models: dict, samples: list[BatchSample]) -> dict:
    out = {name: m.mean_relative_error(samples) for name, m in models.items()} if samples else {}
    out["n"] = len(samples)
    return out


def fit_models(train: list[BatchSample]) -> dict:
    """The profile's model (floor and longest-context terms), the additive model it replaced,
    the paper's form (g = 0) and the token-linear baseline."""
    return {"cost_model": CostModel.fit(train, floor=True, context=True),
            "cost_model_additive": CostModel.fit(train),
            "cost_model_paper": CostModel.fit(train, prefix_read=False),
            "token_linear": TokenLinearModel.fit(train)}


def fit_report(samples: list[BatchSample], train_fraction: float, min_fraction: float, seed: int,
               fit_min_tokens: int | None = None) -> dict:
    """Fit on the training split's batches of >= ``fit_min_tokens`` tokens (default: all of
    them) and score on held-out subsets; ``whole_grid`` is the fit on every batch (the same
    models unless ``fit_min_tokens`` > 1).

    Every batch by default because the cost model now has the two terms that batches below a
    few hundred tokens need (the weight-read floor, the longest context of a prefill-kernel
    batch); without them those batches pulled the per-token slope down by a quarter, so the
    profile used to fit only from MIN / 4. The operating range of the lookahead batcher (>= MIN
    tokens, >= MIN / 4 with margin) is still scored on its own.
    """
    train, held = split_samples(samples, train_fraction, seed)
    min_tokens = min_tokens_from_sweep(samples, min_fraction)
    fit_min = fit_min_tokens or 1
    margin = max(1, min_tokens // 4)

    def report(lower: int) -> dict:
        in_range = [s for s in train if s.num_tokens >= lower]
        models = fit_models(in_range)
        at_least = {n: score(models, [s for s in held if s.num_tokens >= n]) for n in sorted({lower, margin})}
        errors = {
            "held_out": score(models, held),
            **{f"held_out_at_least_{n}_tokens": e for n, e in at_least.items()},
            "held_out_at_least_min_tokens": score(models, [s for s in held if s.num_tokens >= min_tokens]),
            "held_out_by_kind": {k: score(models, [s for s in held if s.kind == k]) for k in KINDS},
            "train": score(models, in_range),
        }
        return {**{name: m.to_dict() for name, m in models.items()}, "fit_min_tokens": lower,
                "train_samples": len(in_range), "errors": errors}

    top = report(fit_min)
    whole = top if fit_min <= 1 else report(1)
    return {**top, "whole_grid": whole, "min_tokens": min_tokens, "samples": len(samples),
            "held_out_samples": len(held)}
