"""Sampler filters and generators."""

from __future__ import annotations

import torch

from kunserve.runtime.sampler import _top_p_filter, sample
from kunserve.sampling_params import SamplingParams
from kunserve.tokenizer import find_stop_string


def draw(logits, params, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {sample(logits[None], [params], [None], gen)[0] for _ in range(n)}


def test_greedy_takes_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    g = SamplingParams(temperature=0)
    assert sample(logits, [g, g], [None, None], torch.Generator()) == [1, 0]


def test_top_k_keeps_only_k_most_likely():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 2.5])
    assert draw(logits, SamplingParams(temperature=1.0, top_k=2)) == {3, 4}


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])
    kept = _top_p_filter(probs.clone(), 0.7)  # 0.5 + 0.25 reaches 0.7
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.5, 0.25, 0.0]) / 0.75)
    assert _top_p_filter(probs.clone(), 0.01).tolist() == [0.0, 1.0, 0.0, 0.0]
    logits = probs.log()
    assert draw(logits, SamplingParams(temperature=1.0, top_p=0.7)) == {1, 2}


def test_seeded_generator_is_reproducible():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0)
    a = [sample(logits, [p], [torch.Generator().manual_seed(5)], torch.Generator())[0] for _ in range(3)]
    assert len(set(a)) == 1


def test_find_stop_string_searches_only_new_text_and_picks_earliest():
    assert find_stop_string("hello world", ("wor", "lo"), 0) == (3, "lo")
    assert find_stop_string("hello world", ("lo",), 6) is None  # "lo" ended before the new text
    assert find_stop_string("hello world", ("o w",), 6) == (4, "o w")  # straddles the boundary
