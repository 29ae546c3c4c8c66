"""KV exchange planning: only peer-owned layers move, chunks cover every page once."""

from __future__ import annotations

import pytest

from kunserve.policy.drop import GreedyDropPlanner, Group, WeightLayout, assign_stages
from kunserve.policy.exchange import (PageTransfer, ResidentRequest, chunk_transfers, plan_exchange,
                                      schedule_exchange)


def test_two_singletons_swap_halves():
    a, b = Group.single(0, 8), Group.single(1, 8)
    merged = assign_stages([a, b], 8)  # 0 keeps [0, 4), 1 keeps [4, 8)
    residents = [ResidentRequest("r0", 0, 10, (3, 5, 9)), ResidentRequest("r1", 1, 4, (0,))]
    plan = plan_exchange((a, b), merged, residents)
    moves = {(t.request_id, t.src, t.dst, t.layers, t.src_pages) for t in plan.transfers}
    assert moves == {("r0", 0, 1, (4, 8), (3, 5, 9)), ("r1", 1, 0, (0, 4), (0,))}
    assert {(t.request_id, t.dst, t.layers) for t in plan.kept} == {("r0", 0, (0, 4)), ("r1", 1, (4, 8))}
    # half of each request's KV moves: (g - 1) / g with g = 2
    assert plan.bytes_moved(bytes_per_token_layer=2) == (10 * 4 + 4 * 4) * 2


def test_pair_plus_pair_moves_only_overlaps():
    a = Group((0, 1), ((0, 4), (4, 8)))
    b = Group((2, 3), ((0, 4), (4, 8)))
    merged = assign_stages([a, b], 8)  # (0, 2, 1, 3) with quarters
    residents = [ResidentRequest("x", 0, 6, (1, 2)), ResidentRequest("x", 1, 6, (7, 8))]
    plan = plan_exchange((a, b), merged, residents)
    assert {(t.src, t.dst, t.layers) for t in plan.transfers} == {(0, 2, (2, 4)), (1, 3, (6, 8))}
    assert {(t.src, t.layers) for t in plan.kept} == {(0, (0, 2)), (1, (4, 6))}


def test_every_layer_of_every_request_lands_exactly_once():
    layout = WeightLayout(layer_bytes=(1,) * 12)
    groups = [Group.single(i, 12) for i in range(3)]
    merged = GreedyDropPlanner(layout).plan(groups, required_bytes=2 * layout.total_bytes).merged[0]
    residents = [ResidentRequest(f"r{i}", i, 5, (i,)) for i in range(3)]
    plan = plan_exchange(tuple(groups), merged, residents)
    for i in range(3):
        covered = sorted(
            layer for t in plan.transfers + plan.kept if t.request_id == f"r{i}" for layer in range(*t.layers)
        )
        assert covered == list(range(12))
        owners = {t.dst: t.layers for t in plan.transfers + plan.kept if t.request_id == f"r{i}"}
        assert owners == dict(zip(merged.members, merged.slices))


def test_chunks_cover_pages_and_tokens_once():
    a, b = Group.single(0, 8), Group.single(1, 8)
    merged = assign_stages([a, b], 8)
    plan = plan_exchange((a, b), merged, [ResidentRequest("r", 0, 37, tuple(range(10, 20)))])
    # page = 4 tokens x 4 layers x 8 bytes = 128 bytes; 300-byte chunks hold 2 pages
    chunks = chunk_transfers(plan.transfers, block_size=4, bytes_per_token_layer=8, chunk_bytes=300)
    assert [c.src_pages for c in chunks] == [(10, 11), (12, 13), (14, 15), (16, 17), (18, 19)]
    assert [c.num_tokens for c in chunks] == [8, 8, 8, 8, 5]
    tiny = chunk_transfers(plan.transfers, block_size=4, bytes_per_token_layer=8, chunk_bytes=1)
    assert len(tiny) == 10  # never fewer than one page per chunk


def test_schedule_rounds_respect_chunk_size_and_request_order():
    transfers = [PageTransfer("a", 0, 1, 3), PageTransfer("b", 0, 1, 2), PageTransfer("c", 1, 0, 1)]
    schedule = schedule_exchange(transfers, held={0: 10, 1: 2}, pool={0: 20, 1: 20}, chunk_pages=2)
    assert [[(p.request_id, p.src, p.dst, p.num_pages) for p in r] for r in schedule.rounds] == [
        [("a", 0, 1, 2), ("c", 1, 0, 1)],  # each link carries at most 2 pages per round
        [("a", 0, 1, 1), ("b", 0, 1, 1)],  # a's pages arrive in order, then b's start
        [("b", 0, 1, 1)],
    ]
    assert schedule.ready_after == {"a": 1, "b": 2, "c": 0}
    assert schedule.ready_in_round(1) == ["a"]
    # what each member holds before each round, and after the last
    assert schedule.held == ({0: 10, 1: 2}, {0: 9, 1: 3}, {0: 7, 1: 5}, {0: 6, 1: 6})
    # budget = pages free on every member in this and every later state
    assert schedule.admission_budget == (10, 11, 13, 14)


def test_schedule_budget_never_shrinks_and_ends_at_the_group_bound():
    transfers = [PageTransfer(f"r{i}", i % 3, (i + 1) % 3, 1 + i % 4) for i in range(12)]
    held = {0: 12, 1: 9, 2: 15}
    pool = {0: 40, 1: 38, 2: 45}
    schedule = schedule_exchange(transfers, held, pool, chunk_pages=3)
    budget = schedule.admission_budget
    assert list(budget) == sorted(budget)  # admitted work is never squeezed out later
    final = schedule.held[-1]
    assert sum(final.values()) == sum(held.values())  # pages move, none appear or vanish
    assert budget[-1] == min(pool[m] - final[m] for m in pool)
    for state, free_then in zip(schedule.held, budget):
        assert all(pool[m] - state[m] >= free_then for m in pool)
    moved = {}
    for r in schedule.rounds:
        for p in r:
            moved[p.request_id] = moved.get(p.request_id, 0) + p.num_pages
        per_link = {}
        for p in r:
            per_link[(p.src, p.dst)] = per_link.get((p.src, p.dst), 0) + p.num_pages
        assert max(per_link.values()) <= 3
    assert moved == {t.request_id: t.num_pages for t in transfers}  # every page exactly once


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="chunk_pages"):
        schedule_exchange([], {}, {0: 1}, chunk_pages=0)
    with pytest.raises(ValueError, match="between two members"):
        schedule_exchange([PageTransfer("r", 1, 1, 2)], {1: 2}, {1: 4}, chunk_pages=1)
