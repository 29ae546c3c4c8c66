"""Rank 0's drop controller: groups merge again, busy groups wait, capacity predictions add up."""

from __future__ import annotations

from kunserve.policy.drop import Group, WeightLayout
from kunserve.policy.overload import OverloadRules
from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot
from kunserve.runtime.drop_controller import DropController

LAYOUT = WeightLayout(layer_bytes=(1000,) * 4)  # one full copy = 4000 bytes
BLOCK = 100  # bytes of a full-model KV block (4 layers): 25 bytes per layer


def snapshot(*busy: int, ids=(0, 1, 2, 3), waiting: int = 0, free: int = 0) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(
        InstanceSnapshot(i, 4, num_blocks=10, num_free_blocks=free, num_running=1, num_waiting=waiting,
                         hol_blocks=waiting, queued_blocks=waiting, exchanging=i in busy) for i in ids))


def controller() -> DropController:
    return DropController(LAYOUT, BLOCK, kv_mapped_bytes=1000, rules=OverloadRules(0.5, 0.0), exchange_chunk_bytes=64)


def test_pairs_then_pairs_merge_again_with_cumulative_capacity():
    drop = controller()
    pairs = drop.plan_for(snapshot(), required=4001)  # two copies' worth: (0, 1) and (2, 3)
    assert [(o.ranks, o.sources) for o in pairs] == [
        ((0, 1), (Group.single(0, 4), Group.single(1, 4))), ((2, 3), (Group.single(2, 4), Group.single(3, 4)))]
    assert all(o.chunk_bytes == 64 and o.aligned for o in pairs)
    # member 1 dropped layers 0-1 (2000 bytes): (1000 + 2000) bytes / (2 layers x 25) = 60 blocks
    assert drop.predicted_blocks == {0: 60, 2: 60}
    assert drop.plan_for(snapshot(0, ids=(0, 2)), required=1) == []  # (0, 1) still exchanging KV: not merged
    [four] = drop.plan_for(snapshot(ids=(0, 2)), required=1)
    assert four.ranks == (0, 2, 1, 3) and four.slices == ((0, 1), (1, 2), (2, 3), (3, 4)) and four.aligned
    assert four.sources == (Group((0, 1), ((0, 2), (2, 4))), Group((2, 3), ((0, 2), (2, 4))))
    # each member has now dropped 3 of 4 layers: (1000 + 3000) / 25 = 160 one-layer blocks
    assert list(drop.groups) == [0] and drop.predicted_blocks == {0: 160}
    assert drop.grouped == {0, 1, 2, 3}


def test_restore_waits_for_the_exchange_and_forgets_the_group():
    drop = controller()
    [order] = drop.plan_for(snapshot(), required=1)
    # the group (0, 1) uses 2 blocks, well under half of the 2 x 10 blocks its members held alone
    assert drop.plan_restore(snapshot(0, ids=(0, 2, 3), free=8)) == []  # exchanging: no split yet
    assert drop.plan_restore(snapshot(ids=(0, 2, 3), free=0)) == []  # 10 used: not under half
    [pull] = drop.plan_restore(snapshot(ids=(0, 2, 3), free=8))
    assert (pull.ranks, pull.phase) == (order.ranks, "pull")  # weights come back while it serves
    assert [g.members for g in drop.current_groups(snapshot(ids=(0, 2, 3)))] == [(2,), (3,)]  # not re-merged
    assert drop.plan_restore(snapshot(0, ids=(0, 2, 3), free=8)) == []  # still pulling
    [split] = drop.plan_restore(snapshot(ids=(0, 2, 3), free=8))
    assert (split.ranks, split.phase) == (order.ranks, "split")
    drop.restored(split)
    assert drop.groups == {} and drop.freed == {} and drop.metrics()["restores_total"] == 1


def test_unaligned_merge_is_flagged():
    drop = controller()
    [order] = drop.plan_for(snapshot(ids=(0, 1, 2)), required=8001)  # three singles -> one group of 3
    assert order.ranks == (0, 1, 2) and not order.aligned  # 4 layers do not split in three evenly
