"""Micro-batch formation (issue 7): lookahead halves balance cost, prefixes stay exact, every
queued token is scheduled exactly once and in causal order, MIN tokens is respected; the
token-budget baseline fills its budget."""

from __future__ import annotations

from collections import defaultdict

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.policy.batching import (
    LookaheadBatcher, TokenBudgetBatcher, cut_at, make_batcher,
)
from kunserve.policy.cost_model import ChunkWork, CostModel

# Roughly an H100 running a Llama-3-8B shape (seconds): attention per prefix pair, per chunk
# pair, per token, per chunk, shared per batch, per prefix token read.
GPU_LIKE = CostModel(a=1.2e-9, b=0.8e-9, f=2.5e-5, d=6e-3, lam=5.8e-3, g=3e-8)


def tokens(batch) -> int:
    return sum(c.num_tokens for c in batch)


def check_plan(queue, plan) -> None:
    """Every queued token exactly once; exact prefixes; pieces of a request in order, at most
    one per micro-batch."""
    pieces = defaultdict(list)  # request id -> [(micro-batch index, piece)]
    for index, batch in enumerate(plan):
        assert batch, "an empty micro-batch"
        ids = [c.request_id for c in batch]
        assert len(ids) == len(set(ids)), f"micro-batch {index} holds two pieces of one request"
        for chunk in batch:
            pieces[chunk.request_id].append((index, chunk))
    assert set(pieces) == {c.request_id for c in queue}
    for work in queue:
        got = pieces[work.request_id]
        assert [i for i, _ in got] == sorted(i for i, _ in got)
        position = work.prefix
        for _, piece in got:
            assert piece.prefix == position, "a piece does not start where the previous one ended"
            position += piece.num_tokens
        assert position == work.end, "tokens lost or scheduled twice"


# -- strategies -------------------------------------------------------------------------------
@st.composite
def queues(draw, max_requests=12, max_tokens=3000):
    n = draw(st.integers(1, max_requests))
    out = []
    for i in range(n):
        decode = draw(st.booleans())
        c = 1 if decode else draw(st.integers(1, max_tokens))
        out.append(ChunkWork(f"r{i}", draw(st.integers(0, 8000)), c))
    return out


@st.composite
def cost_models(draw):
    """Additive models, and models with a weight-read floor and a longest-context term (the
    floor up to f·knee, the most a floor may be; h up to ~10 ms at an 8K context)."""
    coeff = lambda lo, hi: draw(st.one_of(st.just(0.0), st.floats(lo, hi)))  # noqa: E731
    d, f = draw(st.floats(1e-4, 1e-2)), coeff(1e-6, 1e-4)
    knee = draw(st.integers(1, 4096))
    return CostModel(a=coeff(1e-10, 1e-8), b=coeff(1e-10, 1e-8), f=f, d=d, lam=d * draw(st.floats(0, 1)),
                     g=coeff(1e-9, 1e-7), floor=f * knee * draw(st.sampled_from([0.0, 0.5, 1.0])),
                     knee_tokens=knee, h=coeff(1e-8, 1.5e-6))


# -- lookahead --------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(queue=queues(), model=cost_models(), min_tokens=st.integers(1, 2000))
def test_lookahead_schedules_every_token_once_in_causal_order(queue, model, min_tokens):
    plan = LookaheadBatcher(model, min_tokens).form(queue)
    check_plan(queue, plan)


@settings(max_examples=300, deadline=None)
@given(queue=queues(), model=cost_models(), min_tokens=st.integers(1, 2000))
def test_lookahead_respects_min_tokens_and_stops_only_when_it_must(queue, model, min_tokens):
    batcher = LookaheadBatcher(model, min_tokens)
    plan = batcher.form(queue)
    if tokens(queue) < min_tokens:
        assert plan == [tuple(queue)]
    else:
        assert all(tokens(b) >= min_tokens for b in plan)
    assert len(plan) & (len(plan) - 1) == 0, "levels are halved whole: 2^L micro-batches"
    assert any(batcher.split(b) is None for b in plan), "stopped although every batch could split"


def gaps(model, batch) -> list[float]:
    """cost(left) − cost(right) for every cut position 1 .. tokens − 1."""
    return [model.batch_cost(left) - model.batch_cost(right)
            for left, right in (cut_at(batch, pos) for pos in range(1, tokens(batch)))]


@settings(max_examples=300, deadline=None)
@given(queue=queues(max_requests=6, max_tokens=300), model=cost_models())
def test_lookahead_cut_is_within_one_token_of_the_most_balanced(queue, model):
    batch = tuple(queue)
    if tokens(batch) < 2:
        return
    left, right = LookaheadBatcher(model, 1).split(batch)
    gap = abs(model.batch_cost(left) - model.batch_cost(right))
    every = gaps(model, batch)
    one_token = max((abs(b - a) for a, b in zip(every, every[1:])), default=0.0)
    assert gap <= min(map(abs, every)) + one_token + 1e-12


@settings(max_examples=300, deadline=None)
@given(queue=queues(max_requests=6, max_tokens=300), model=cost_models())
def test_lookahead_cut_is_the_most_balanced_when_the_gap_is_monotone(queue, model):
    # a <= 2b and g = 0: moving the cut right never lowers the left half's cost nor raises the
    # right half's, so the bisection must find the exact optimum.
    model = attrs.evolve(model, a=min(model.a, 2 * model.b), g=0.0)
    batch = tuple(queue)
    if tokens(batch) < 2:
        return
    left, right = LookaheadBatcher(model, 1).split(batch)
    gap = abs(model.batch_cost(left) - model.batch_cost(right))
    assert gap <= min(map(abs, gaps(model, batch))) * (1 + 1e-9) + 1e-15


@settings(max_examples=200, deadline=None)
@given(queue=queues(max_requests=6, max_tokens=300), model=cost_models(), extra=st.integers(1, 400))
def test_batch_cost_never_falls_as_work_is_added(queue, model, extra):
    # What the cut search stands on: across chunk boundaries the gap never falls.
    batch = tuple(queue)
    for i in range(1, len(batch)):
        assert model.batch_cost(batch[:i + 1]) >= model.batch_cost(batch[:i]) - 1e-15
    last = batch[-1]
    longer = batch[:-1] + (ChunkWork(last.request_id, last.prefix, last.num_tokens + extra),)
    assert model.batch_cost(longer) >= model.batch_cost(batch) - 1e-15


def test_halves_within_one_percent_of_equal_cost_on_a_burst():
    # 40 queued prompts of mixed length and 64 running decodes over long contexts.
    queue = [ChunkWork(f"d{i}", 1000 + 97 * i, 1) for i in range(64)]
    queue += [ChunkWork(f"p{i}", 0, 200 + (i * 337) % 3000) for i in range(40)]
    batcher = LookaheadBatcher(GPU_LIKE, min_tokens=512)
    left, right = batcher.split(tuple(queue))
    lc, rc = GPU_LIKE.batch_cost(left), GPU_LIKE.batch_cost(right)
    assert abs(lc - rc) <= 0.01 * (lc + rc) / 2
    plan = batcher.form(queue)
    check_plan(queue, plan)
    assert len(plan) >= 8 and all(tokens(b) >= 512 for b in plan)
    costs = [GPU_LIKE.batch_cost(b) for b in plan]
    assert max(costs) <= 1.05 * min(costs)


def shipped_h100_model() -> CostModel:
    from pathlib import Path

    import kunserve
    from kunserve.policy.cost_model import Profile

    return Profile.from_json(Path(kunserve.__file__).parent / "data" / "profiles" / "h100-llama3-8b.json").cost_model


def test_the_shipped_floor_model_is_cut_like_brute_force():
    # The H100 profile's model has a weight-read floor and a longest-context term; small batches
    # (below its knee, decodes over long contexts, a short prefill) are where both bind.
    model = shipped_h100_model()
    additive = attrs.evolve(model, floor=0.0, h=0.0)
    assert model.floor > 0 and model.h > 0
    queues_ = [
        [ChunkWork(f"d{i}", 7000 + 13 * i, 1) for i in range(5)] + [ChunkWork("p", 0, 150)],
        [ChunkWork("c", 6000, 40), ChunkWork("d", 8000, 1), ChunkWork("p", 0, 90)],
        [ChunkWork("p", 0, 300)],
        [ChunkWork(f"d{i}", 500 * i, 1) for i in range(12)],
    ]
    context_bound = 0
    for queue in queues_:
        batch = tuple(queue)
        left, right = LookaheadBatcher(model, 1).split(batch)
        assert max(tokens(left), tokens(right)) < model.knee_tokens  # the floor is in both halves
        context_bound += model.batch_cost(right) > additive.batch_cost(right) + model.floor * (
            1 - tokens(right) / model.knee_tokens) + 1e-12
        gap = abs(model.batch_cost(left) - model.batch_cost(right))
        assert gap <= min(map(abs, gaps(model, batch))) * (1 + 1e-9) + 1e-15
    assert context_bound >= 2


def test_the_shipped_floor_model_balances_a_burst():
    model = shipped_h100_model()
    queue = [ChunkWork(f"d{i}", 1000 + 97 * i, 1) for i in range(64)]
    queue += [ChunkWork(f"p{i}", 0, 200 + (i * 337) % 3000) for i in range(40)]
    plan = LookaheadBatcher(model, 2048).form(queue)
    check_plan(queue, plan)
    costs = [model.batch_cost(b) for b in plan]
    assert len(plan) >= 8 and max(costs) <= 1.02 * min(costs)


def test_a_long_prompt_is_cut_before_its_middle_with_exact_prefix():
    # Later tokens attend to more keys, so equal cost needs more tokens in the first piece.
    model = CostModel(a=1e-8, b=1e-8, f=1e-6, d=0.0, lam=0.0)
    left, right = LookaheadBatcher(model, 1).split((ChunkWork("r", 0, 4000),))
    (head,), (tail,) = left, right
    assert head.prefix == 0 and tail.prefix == head.num_tokens
    assert head.num_tokens + tail.num_tokens == 4000
    assert head.num_tokens > 2000
    assert abs(model.batch_cost(left) - model.batch_cost(right)) <= model.chunk_cost(ChunkWork("x", 3999, 1))


def test_per_token_costs_split_at_the_token_middle():
    model = CostModel(a=0.0, b=0.0, f=1.0, d=0.0, lam=0.0)
    queue = [ChunkWork("a", 5, 300), ChunkWork("b", 0, 500)]
    left, right = LookaheadBatcher(model, 1).split(tuple(queue))
    assert left == (ChunkWork("a", 5, 300), ChunkWork("b", 0, 100))
    assert right == (ChunkWork("b", 100, 400),)


def test_siblings_stop_at_the_same_depth():
    # Equal-cost halves of a long prompt hold unequal tokens (the second attends to more keys).
    # Halving each on its own until it reaches MIN would split only the first one again and
    # leave micro-batches a factor ~2 apart in cost; level-by-level halving keeps them equal.
    model = CostModel(a=1e-8, b=5e-9, f=1e-5, d=0.0, lam=0.0)
    queue = [ChunkWork("r", 0, 8000)]
    plan = LookaheadBatcher(model, 1800).form(queue)
    costs = [model.batch_cost(b) for b in plan]
    assert len(plan) == 2 and max(costs) <= 1.001 * min(costs)
    assert tokens(plan[0]) >= 2 * 1800 > tokens(plan[1])  # the first could split again, alone


def test_min_tokens_stops_the_recursion():
    model = CostModel(a=0.0, b=0.0, f=1.0, d=0.0, lam=0.0)
    queue = [ChunkWork("a", 0, 1000)]
    assert [tokens(b) for b in LookaheadBatcher(model, 250).form(queue)] == [250] * 4
    assert [tokens(b) for b in LookaheadBatcher(model, 251).form(queue)] == [500, 500]
    assert [tokens(b) for b in LookaheadBatcher(model, 501).form(queue)] == [1000]


def test_an_unbalanced_decode_tail_is_not_split_below_min():
    # One decode over a huge context costs more than everything else: the balanced cut would
    # leave it alone (1 token), below MIN, so the batch stays whole.
    model = CostModel(a=1e-6, b=0.0, f=1e-6, d=0.0, lam=0.0)
    queue = [ChunkWork("p", 0, 100), ChunkWork("d", 1_000_000, 1)]
    assert LookaheadBatcher(model, 50).form(queue) == [tuple(queue)]
    assert LookaheadBatcher(model, 1).split(tuple(queue)) == ((queue[0],), (queue[1],))


def test_lookahead_rejects_bad_input():
    batcher = LookaheadBatcher(GPU_LIKE, 16)
    assert batcher.form([]) == []
    with pytest.raises(ValueError, match="queued twice"):
        batcher.form([ChunkWork("a", 0, 5), ChunkWork("a", 5, 5)])
    with pytest.raises(ValueError, match="min_tokens"):
        LookaheadBatcher(GPU_LIKE, 0)
    with pytest.raises(TypeError):
        LookaheadBatcher("not a model", 16)


def test_lookahead_beats_token_budget_on_balance():
    """The point of issue 7: with equal token counts, a chunked prompt's later pieces cost more;
    cost-balanced micro-batches spread much less."""
    queue = [ChunkWork(f"p{i}", 0, 8000) for i in range(4)]
    spread = lambda plan: max(map(GPU_LIKE.batch_cost, plan)) / min(map(GPU_LIKE.batch_cost, plan))  # noqa: E731
    lookahead = LookaheadBatcher(GPU_LIKE, 2048).form(queue)
    budget = TokenBudgetBatcher(4000).form(queue)
    assert len(lookahead) == len(budget) == 8
    assert spread(lookahead) < 1.01 and spread(budget) > 1.1


# -- token budget -----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(queue=queues(), max_tokens=st.integers(1, 4000))
def test_token_budget_fills_each_micro_batch(queue, max_tokens):
    plan = TokenBudgetBatcher(max_tokens).form(queue)
    check_plan(queue, plan)
    assert all(tokens(b) == max_tokens for b in plan[:-1])
    assert 1 <= tokens(plan[-1]) <= max_tokens
    # Queue order is kept: flattening the plan lists requests in queue order.
    order = [c.request_id for b in plan for c in b]
    assert [r for i, r in enumerate(order) if i == 0 or order[i - 1] != r] == [c.request_id for c in queue]


def test_token_budget_chunks_the_last_request():
    plan = TokenBudgetBatcher(100).form([ChunkWork("a", 0, 60), ChunkWork("b", 7, 90)])
    assert plan == [(ChunkWork("a", 0, 60), ChunkWork("b", 7, 40)), (ChunkWork("b", 47, 50),)]


# -- selection by name ------------------------------------------------------------------------
def test_make_batcher_by_name():
    assert make_batcher("lookahead", cost_model=GPU_LIKE, min_tokens=64) == LookaheadBatcher(GPU_LIKE, 64)
    assert make_batcher("token-budget", max_tokens=512) == TokenBudgetBatcher(512)
    with pytest.raises(ValueError, match="cost_model and min_tokens"):
        make_batcher("lookahead", max_tokens=512)
    with pytest.raises(ValueError, match="max_tokens"):
        make_batcher("token-budget")
    with pytest.raises(ValueError, match="unknown batcher 'sarathi'"):
        make_batcher("sarathi", max_tokens=1)


def test_lookahead_decode_cost_is_a_decodes_share_of_a_batch():
    model = CostModel(a=1e-6, b=2e-6, f=1e-5, d=3e-4, lam=2e-4, g=5e-7)
    batcher = LookaheadBatcher(model, min_tokens=16)
    decodes = [ChunkWork(str(i), p, 1) for i, p in enumerate((10, 500, 2000))]
    # adding a decode over context p + 1 to a batch raises its cost by exactly decode_cost(p + 1)
    for p in (0, 99, 4095):
        extra = ChunkWork("new", p, 1)
        assert model.batch_cost([*decodes, extra]) - model.batch_cost(decodes) == \
            pytest.approx(batcher.decode_cost(p + 1), rel=1e-12)
    assert batcher.decode_cost(4096) > batcher.decode_cost(100) > 0
