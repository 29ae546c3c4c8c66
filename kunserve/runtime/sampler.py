"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeded generators."""

from __future__ import annotations

import torch

from kunserve.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor,  # [n, vocab] fp32, one row per request that emits a token
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> list[int]:
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            tokens.append(greedy[row])
        else:
            # Random rows sample on the CPU so a seeded request gives the same tokens anywhere.
            tokens.append(_sample_row(logits[row].cpu(), p, gen or default_generator))
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits = logits / p.temperature  # [vocab]
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        probs = _top_p_filter(probs, p.top_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0  # the top token always survives
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
