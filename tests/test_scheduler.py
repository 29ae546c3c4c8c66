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


def chunks_of(output):
    return [(c.request.request_id, c.start, c.num_tokens, c.completes) for c in output.chunks]


def test_a_prompt_continues_in_the_other_sets_step_while_its_chunk_is_in_flight():
    # one 20-token prompt, an 8-token budget: set 0 takes [0, 8); set 1, stepping before that
    # result is back, takes the next chunk [8, 16) after it (its prefix KV is written first: every
    # stage runs steps in launch order); set 0 then takes the last one, which samples
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=8)
    s.add(req("a", 20))
    first = s.schedule(virtual_engine=0, num_virtual_engines=2)
    second = s.schedule(virtual_engine=1, num_virtual_engines=2)
    assert chunks_of(first) == [("a", 0, 8, False)] and chunks_of(second) == [("a", 8, 8, False)]
    assert s.num_continued_prefill_chunks == 1
    a = first.chunks[0].request
    assert a.virtual_engine == 0 and a.num_computed_tokens == 0 and a.num_in_flight_tokens == 16
    assert len(s.block_manager.block_table("a")) == 4  # blocks for every in-flight token
    s.update(first, {})
    third = s.schedule(virtual_engine=0, num_virtual_engines=2)
    assert chunks_of(third) == [("a", 16, 4, True)]
    # the chunk that samples is in flight: nobody may schedule past it, whatever the set
    assert a.num_unscheduled_tokens == 0
    assert plan_of(s.schedule(virtual_engine=1, num_virtual_engines=2)) == []
    s.update(second, {})
    s.update(third, {"a": 7})
    assert (a.num_computed_tokens, a.num_in_flight_tokens, a.output_token_ids) == (20, 0, [7])
    assert chunks_of(s.schedule(virtual_engine=0, num_virtual_engines=2)) == [("a", 20, 1, True)]


def test_continued_prompts_come_after_the_sets_own_requests_and_before_admissions():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=8)
    s.add(req("a", 20))
    s.add(req("b", 2))
    s.update(s.schedule(virtual_engine=1, num_virtual_engines=2), {})  # a: [0, 8) in set 1
    s.add(req("c", 4))
    out = s.schedule(virtual_engine=0, num_virtual_engines=2)
    assert chunks_of(out) == [("a", 8, 8, False)]  # running before waiting: b and c wait
    s.update(out, {})
    decode = s.schedule(virtual_engine=1, num_virtual_engines=2)
    assert chunks_of(decode) == [("a", 16, 4, True), ("b", 0, 2, True), ("c", 0, 2, False)]


def test_a_decode_and_a_prompts_last_token_stay_with_their_own_set():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=8)
    s.add(req("a", 9))
    s.add(req("b", 2))
    first = s.schedule(virtual_engine=0, num_virtual_engines=2)  # a: [0, 8), one token left
    assert chunks_of(first) == [("a", 0, 8, False)]
    s.update(first, {})
    s.update(s.schedule(virtual_engine=1, num_virtual_engines=2), {"b": 7})  # only b, admitted
    # set 0's a (1 token left) and set 1's b (a decode) are not taken by the other set
    assert plan_of(s.schedule(virtual_engine=1, num_virtual_engines=2)) == [("b", 1)]


def test_a_continuation_never_preempts_and_blocks_admission_where_blocks_run_out():
    # 5 blocks of 4 tokens: a (set 0) gets [0, 8) (2 blocks), then [8, 16) in set 1's step
    # (2 more); its next chunk [16, 24) needs a 6th block: set 1's step neither preempts for it
    # nor admits the newer b into the one free block a will need
    s = Scheduler(BlockManager(num_blocks=5, block_size=4), max_num_seqs=8, max_num_batched_tokens=8)
    s.add(req("a", 24))
    s.update(s.schedule(virtual_engine=0, num_virtual_engines=2), {})
    s.add(req("b", 4))
    s.update(s.schedule(virtual_engine=1, num_virtual_engines=2), {})  # budget spent on a: b waits
    a = s.running[0]
    assert a.num_computed_tokens == 16 and [r.request_id for r in s.running] == ["a"]
    out = s.schedule(virtual_engine=1, num_virtual_engines=2)
    assert chunks_of(out) == [] and out.preempted == () and s.num_preemptions == 0
    assert [r.request_id for r in s.waiting] == ["b"] and s.block_manager.num_free_blocks == 1


def test_preempting_a_request_with_chunks_in_flight_drops_them():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=8)
    s.add(req("a", 20))
    first = s.schedule(virtual_engine=0, num_virtual_engines=2)
    second = s.schedule(virtual_engine=1, num_virtual_engines=2)
    a = first.chunks[0].request
    s.running.remove(a)
    s.preempt(a)
    assert (a.num_computed_tokens, a.num_in_flight_tokens) == (0, 0)
    s.update(first, {})
    s.update(second, {})
    assert (a.num_computed_tokens, a.num_in_flight_tokens) == (0, 0)
    assert chunks_of(s.schedule(virtual_engine=0, num_virtual_engines=2)) == [("a", 0, 8, False)]


def test_sets_are_balanced_by_decode_cost_when_one_is_given():
    # four decoding requests, two with long contexts: by count set 0 keeps a, b (both long) and
    # hands c, d over; by cost (here the context) the newest go while that narrows the gap:
    # d, c, then b, leaving a alone (loads 201 vs 223: moving a would not narrow it)
    s = Scheduler(BlockManager(num_blocks=256, block_size=4), max_num_seqs=8, max_num_batched_tokens=512)
    for rid, n in (("a", 200), ("b", 200), ("c", 10), ("d", 10)):
        s.add(req(rid, n))
    s.update(s.schedule(), {r: 7 for r in "abcd"})  # a single engine: every request in set 0
    by_count = plan_of(s.schedule(virtual_engine=0, num_virtual_engines=2))
    assert by_count == [("a", 1), ("b", 1)]  # c, d moved: the sets' contexts are 402 vs 22
    for r in s.running:  # as a single engine again: every request back in set 0, nothing in flight
        r.virtual_engine, r.num_in_flight_tokens = 0, 0
    assert plan_of(s.schedule(virtual_engine=0, num_virtual_engines=2, decode_cost=float)) == [("a", 1)]
    loads = [sum(r.num_tokens for r in s.running if r.virtual_engine == v) for v in (0, 1)]
    assert loads == [201, 223]
