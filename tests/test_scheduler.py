"""Exact-id tests of the block manager and the scheduler (admission, chunking, preemption)."""

from __future__ import annotations

import pytest

from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request, RequestStatus
from kunserve.runtime.scheduler import Scheduler
from kunserve.sampling_params import SamplingParams


def req(rid, prompt_len, max_tokens=100):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=max_tokens),
                   max_total_tokens=prompt_len + max_tokens)


def plan_of(output):
    return [(c.request.request_id, c.num_tokens) for c in output.chunks]


def step(scheduler, token=7):
    """Schedule one step and feed back a token for each completing chunk."""
    out = scheduler.schedule()
    sampled = {c.request.request_id: token for c in out.chunks if c.completes}
    scheduler.update(out, sampled)
    return out


# -- block manager -------------------------------------------------------------------------------

def test_block_manager_hands_out_lowest_ids_and_recycles_at_the_back():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("b", 4) == [2]
    assert bm.allocate("a", 8) == []  # 8 tokens still fit in 2 blocks
    assert bm.allocate("a", 9) == [3]
    assert bm.block_table("a") == [0, 1, 3] and bm.num_free_blocks == 2
    bm.free("a")
    assert bm.num_free_blocks == 5
    assert bm.allocate("c", 12) == [4, 5, 0]  # free queue order: 4, 5, then a's 0, 1, 3


def test_block_manager_ref_counts_keep_shared_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.share("a", "b")
    assert bm.block_table("b") == [0, 1]
    bm.free("a")
    assert bm.num_free_blocks == 2  # b still references 0 and 1
    bm.free("b")
    assert bm.num_free_blocks == 4
    assert bm.allocate("c", 8) == [2, 3, 0, 1]


def test_block_manager_refuses_overallocation():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate("a", 9)
    with pytest.raises(RuntimeError, match="needs 3 blocks but only 2 are free"):
        bm.allocate("a", 9)
    assert bm.num_free_blocks == 2


# -- scheduler -----------------------------------------------------------------------------------

def test_fcfs_admission_and_chunked_prefill_under_token_budget():
    bm = BlockManager(num_blocks=100, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    for rid, n in [("a", 6), ("b", 7), ("c", 3)]:
        s.add(req(rid, n))
    assert plan_of(step(s)) == [("a", 6), ("b", 4)]  # b chunked to the remaining budget
    assert plan_of(step(s)) == [("a", 1), ("b", 3), ("c", 3)]  # a decodes, b finishes prefill
    assert plan_of(step(s)) == [("a", 1), ("b", 1), ("c", 1)]
    assert bm.block_table("a") == [0, 1] and bm.block_table("b") == [2, 3] and bm.block_table("c") == [4]


def test_max_num_seqs_limits_admission():
    s = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        s.add(req(rid, 2))
    assert plan_of(step(s)) == [("a", 2), ("b", 2)]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_head_of_line_request_is_not_overtaken():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    s.add(req("a", 12))
    s.add(req("big", 8))  # needs 2 blocks, only 1 left after a
    s.add(req("small", 2))  # would fit, but FCFS keeps it behind "big"
    assert plan_of(step(s)) == [("a", 12)]
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_preemption_takes_newest_running_and_requeues_it_first():
    bm = BlockManager(num_blocks=6, block_size=1)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    for rid, n in [("a", 2), ("b", 2), ("c", 1), ("d", 1)]:
        s.add(req(rid, n))
    assert plan_of(step(s)) == [("a", 2), ("b", 2), ("c", 1), ("d", 1)]  # pool now full
    out = step(s)  # a needs a block: d (newest) goes; b needs one: c goes
    assert out.preempted == ("d", "c")
    assert plan_of(out) == [("a", 1), ("b", 1)]
    assert [r.request_id for r in s.waiting] == ["c", "d"]  # the older victim at the head
    c = s.waiting[0]
    assert c.num_computed_tokens == 0 and c.metrics.num_preemptions == 1 and c.status is RequestStatus.WAITING
    assert c.token_ids == [1, 7]  # recompute covers prompt and the token already generated
    assert bm.block_table("a") == [0, 1, 5] and bm.block_table("b") == [2, 3, 4]
    assert bm.block_table("c") == [] and s.num_preemptions == 2


def test_no_admission_in_a_step_that_preempted():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    s.add(req("a", 4))
    s.add(req("b", 4))
    step(s)  # a, b hold 2 blocks each
    s.add(req("tiny", 1))
    out = step(s)  # a needs a block: b is preempted, 2 blocks free, yet nobody is admitted
    assert out.preempted == ("b",) and plan_of(out) == [("a", 1)]
    assert [r.request_id for r in s.waiting] == ["b", "tiny"]
    out = step(s)  # b (5 tokens to recompute) needs 3 blocks, 1 is free: it waits, tiny too
    assert plan_of(out) == [("a", 1)]
    assert [r.request_id for r in s.waiting] == ["b", "tiny"]


def test_request_preempting_itself_when_it_is_newest():
    bm = BlockManager(num_blocks=3, block_size=2)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    s.add(req("a", 2))
    s.add(req("b", 4))
    step(s)  # a: 1 block, b: 2 blocks; pool full
    out = step(s)  # a needs a 2nd block -> preempts b; b's slot in the loop is then gone
    assert out.preempted == ("b",) and plan_of(out) == [("a", 1)]


def test_finished_requests_free_blocks_and_leave():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    s.add(req("a", 3, max_tokens=2))
    step(s)
    out = s.schedule()
    finished = s.update(out, {"a": 9})
    assert [r.request_id for r in finished] == ["a"]
    assert finished[0].status is RequestStatus.FINISHED_LENGTH
    assert finished[0].output_token_ids == [7, 9]
    assert bm.num_free_blocks == 10 and not s.has_unfinished()


def test_stop_token_and_eos_finish_with_stop():
    s = Scheduler(BlockManager(10, 4), max_num_seqs=8, max_num_batched_tokens=100)
    r = Request("a", [1, 2], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[5]), 12, eos_token_ids=(2,))
    s.add(r)
    step(s, token=5)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 5
    e = Request("e", [1, 2], SamplingParams(temperature=0, max_tokens=10), 12, eos_token_ids=(2,))
    s.add(e)
    step(s, token=2)
    assert e.status is RequestStatus.FINISHED_STOPPED and e.stop_reason is None
    ignore = Request("i", [1, 2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), 12, eos_token_ids=(2,))
    s.add(ignore)
    step(s, token=2)
    assert ignore.status is RequestStatus.RUNNING


# -- virtual engines (an overlapped pipeline leader steps its requests in sets) -------------------

def test_virtual_engine_steps_only_its_set_and_admits_into_it():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=8)
    for rid in "abcd":
        s.add(req(rid, 4))
    first = s.schedule(virtual_engine=0, num_virtual_engines=2)  # a, b fill the 8-token budget
    assert plan_of(first) == [("a", 4), ("b", 4)]
    second = s.schedule(virtual_engine=1, num_virtual_engines=2)  # a, b are in flight: not stepped
    assert plan_of(second) == [("c", 4), ("d", 4)]
    assert [r.virtual_engine for r in s.running] == [0, 0, 1, 1]
    s.update(first, {"a": 7, "b": 7})
    again = s.schedule(virtual_engine=0, num_virtual_engines=2)
    assert plan_of(again) == [("a", 1), ("b", 1)]  # set 1's prefills still await their tokens


def test_virtual_engine_preempts_only_within_its_set():
    # 6 blocks of 4 tokens: a (set 0) and b, c (set 1) hold 2 blocks each, nothing free
    s = Scheduler(BlockManager(num_blocks=6, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    s.add(req("a", 8))
    s.update(s.schedule(virtual_engine=0, num_virtual_engines=2), {"a": 7})
    s.add(req("b", 8))
    s.add(req("c", 8))
    s.update(s.schedule(virtual_engine=1, num_virtual_engines=2), {"b": 7, "c": 7})
    out = s.schedule(virtual_engine=0, num_virtual_engines=2)  # a must grow to a 3rd block
    # c (set 1, the newest) is in flight in the overlapped engine: a preempts itself, not c
    assert out.preempted == ("a",) and plan_of(out) == []
    assert {r.request_id for r in s.running} == {"b", "c"}


def test_virtual_engines_rebalance_a_lopsided_set():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    for rid in "abcde":
        s.add(req(rid, 2))
    s.update(s.schedule(), {r: 7 for r in "abcde"})  # a single engine: every request in set 0
    out = s.schedule(virtual_engine=0, num_virtual_engines=2)
    # set 0 keeps 3 (within one of set 1's 2); the newest two move and run at set 1's step
    assert plan_of(out) == [("a", 1), ("b", 1), ("c", 1)]
    assert plan_of(s.schedule(virtual_engine=1, num_virtual_engines=2)) == [("d", 1), ("e", 1)]


def test_a_result_for_a_request_preempted_or_aborted_meanwhile_is_dropped():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    for rid in "ab":
        s.add(req(rid, 4))
    in_flight = s.schedule(virtual_engine=0, num_virtual_engines=2)
    a, b = (c.request for c in in_flight.chunks)
    s.running.remove(a)
    s.preempt(a)  # e.g. a weight restore's round took its blocks
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not any(s.is_current(c) for c in in_flight.chunks)
    s.update(in_flight, {"a": 7, "b": 7})
    assert a.num_computed_tokens == 0 and a.output_token_ids == [] and b.output_token_ids == []


def test_set_numbers_from_a_larger_group_fold_into_the_current_sets():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    for rid in "abcd":
        s.add(req(rid, 2))
    s.update(s.schedule(), {r: 7 for r in "abcd"})
    for request, old_set in zip(s.running, (0, 1, 2, 3)):  # as a 4-stage group left them
        request.virtual_engine = old_set
    stepped = plan_of(s.schedule(virtual_engine=0, num_virtual_engines=2)) + \
        plan_of(s.schedule(virtual_engine=1, num_virtual_engines=2))
    assert sorted(stepped) == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]  # nobody starves
