"""KV exchange planning: only peer-owned layers move, chunks cover every page once."""

from __future__ import annotations

from kunserve.policy.drop import GreedyDropPlanner, Group, WeightLayout, assign_stages
from kunserve.policy.exchange import ResidentRequest, chunk_transfers, plan_exchange


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
