"""Least squares behind ``CostModel.fit``: non-negative, relative to each batch's time, and
the two batch-level terms' nonlinear parts (the floor's knee is scanned, the context term's
max is fitted by assigning each batch the branch that binds). numpy only; returns raw
coefficients, which ``cost_model`` turns into models."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def nnls(x: np.ndarray, y: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """argmin ||x·w − y|| subject to w >= 0 (Lawson–Hanson active set). x: [n, m], y: [n].

    Columns are scaled to unit norm first: the features span ~10 orders of magnitude (c·p
    reaches 10^7, the constant is 1), which a plain solve would round away.
    """
    norms = np.linalg.norm(x, axis=0)  # [m]
    norms[norms == 0] = 1.0
    xs = x / norms
    m = xs.shape[1]
    w = np.zeros(m)
    passive = np.zeros(m, dtype=bool)
    for _ in range(max_iter):
        gradient = xs.T @ (y - xs @ w)  # [m]: where the residual still points
        candidates = ~passive & (gradient > 1e-12)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, gradient, -np.inf))] = True
        while True:
            trial = np.zeros(m)
            trial[passive] = np.linalg.lstsq(xs[:, passive], y, rcond=None)[0]
            if (trial[passive] > 0).all():
                w = trial
                break
            # Step from w towards trial until the first passive coefficient reaches zero.
            blocking = passive & (trial <= 0)
            step = np.min(w[blocking] / (w[blocking] - trial[blocking]))
            w = w + step * (trial - w)
            passive &= w > 1e-15
            w[~passive] = 0.0
    return w / norms


# -- JSON -------------------------------------------------------------------------------------


_BRANCH_ROUNDS = 20  # solves per knee; on the H100 grid 4-6 on average, a few knees flip-flop to the cap


def knee_candidates(tokens: Sequence[int]) -> list[int | None]:
    """Knees to scan: a quarter-octave ladder strictly inside the batches' token range (a knee
    with no batch below it would extrapolate a floor nothing measured); [None] if there is none."""
    lo, hi = min(tokens), max(tokens)
    out, i = [], 0
    while (knee := round(2 ** (i / 4))) < hi:
        if knee > lo and knee not in out:
            out.append(knee)
        i += 1
    return out or [None]


def fit_batch_terms(samples: Sequence, prefix_read: bool, knee: int | None,
                    context: bool) -> tuple[np.ndarray, float]:
    """(coefficients, RMS relative training error) with the floor's knee at ``knee`` tokens
    (None: no floor) and, with ``context``, the longest-context term; ``samples`` are
    ``BatchSample`` s (chunks with ``prefix``, ``num_tokens``, ``end``; ``seconds``).

    Columns (a, b, f − u, d − λ, λ[, g][, u][, h]): for a knee, ``f·T + floor·max(0, 1 − T/knee)
    = (f − u)·T + u·max(T, knee)`` with ``floor = u·knee``, linear. The context term makes a
    batch's attention ``max(work, h·C)``: each batch gets the columns of the branch that binds
    (work: Σcp, Σc², Σp; latency: C), first both, then the one the last solve says binds, until
    no batch changes branch.
    """
    rows = []
    for s in samples:
        ch = s.chunks
        tokens = sum(c.num_tokens for c in ch)
        rows.append((sum(c.num_tokens * c.prefix for c in ch), sum(c.num_tokens ** 2 for c in ch), tokens,
                     len(ch), sum(c.prefix for c in ch), max(tokens, knee or 0),
                     max(c.end for c in ch) if any(c.num_tokens > 1 for c in ch) else 0))
    cp, cc, t, k, p, knee_t, longest = np.array(rows, dtype=np.float64).T  # each [n]
    y = np.array([s.seconds for s in samples], dtype=np.float64)  # [n]
    columns = [cp, cc, t, k, np.ones_like(y)] + [p] * prefix_read + [knee_t] * bool(knee)
    x_work = np.stack(columns + [np.zeros_like(y)] * context, axis=1)  # [n, m]: attention = work
    if x_work.shape[0] < x_work.shape[1]:
        raise ValueError(f"need at least {x_work.shape[1]} samples to fit {x_work.shape[1]} coefficients, "
                         f"got {x_work.shape[0]}")
    x_latency, x = x_work.copy(), x_work  # latency: attention = h·C, the work columns give way
    if context:
        x_latency[:, [0, 1, 5] if prefix_read else [0, 1]] = 0.0
        x_latency[:, -1] = longest
        x = x_work.copy()
        x[:, -1] = longest  # round 0: both branches summed
    best, binds = None, None
    for _ in range(_BRANCH_ROUNDS):
        w = nnls(x / y[:, None], np.ones_like(y))
        predicted = np.maximum(x_work @ w, x_latency @ w)  # [n]: the model (the max of both branches)
        error = float(np.sqrt(np.mean((predicted / y - 1) ** 2)))
        if best is None or error < best[1]:
            best = (w, error)
        now = x_latency @ w > x_work @ w  # [n]: where the longest context binds
        if not context or (binds is not None and (now == binds).all()):
            break
        binds = now
        x = np.where(binds[:, None], x_latency, x_work)
    return best[0], best[1]
