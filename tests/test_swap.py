"""Swap preemption (--policy swap): host swap space, the policy object, exact-id scheduling and
token-exact engine runs on the tiny model under a pool small enough to force swaps."""

from __future__ import annotations

import pytest
import torch

from kunserve import LLM, SamplingParams
from kunserve.config import EngineConfig
from kunserve.policy.preemption import Preempt, RecomputePreemption, SwapPreemption
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import RequestStatus
from kunserve.runtime.scheduler import Scheduler, SchedulerOutput
from kunserve.runtime.swap import HostBlockPool, HostSwapSpace, SwapOp, Swapper, _runs
from test_scheduler import plan_of, req, step

# -- host swap space -----------------------------------------------------------------------------

BLOCK_SHAPE = (2, 2, 4, 2, 8)  # [layers, 2, block_size, kv_heads, head_dim]


def device_kv(num_blocks=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, *BLOCK_SHAPE), generator=g).to(dtype)


def test_host_pool_hands_out_and_takes_back_exactly_its_capacity():
    pool = HostBlockPool(5)
    first = pool.allocate(3)
    assert first == [0, 1, 2] and pool.num_free_blocks == 2
    with pytest.raises(RuntimeError, match="need 3 host swap blocks, only 2"):
        pool.allocate(3)
    pool.free([1])
    again = pool.allocate(3)
    assert sorted(again) == [1, 3, 4] and pool.num_free_blocks == 0
    pool.free(first[:1] + first[2:] + again)
    assert pool.num_free_blocks == 5
    with pytest.raises(AssertionError):
        HostBlockPool(2).free([0])  # never handed out
    assert HostBlockPool(0).num_free_blocks == 0


def test_runs_merge_blocks_consecutive_on_both_sides():
    assert list(_runs((5, 6, 7, 2, 3), (0, 1, 2, 3, 9))) == [(5, 0, 3), (2, 3, 1), (3, 9, 1)]
    assert list(_runs((), ())) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_out_then_in_round_trips_exact_bytes_into_other_blocks(dtype):
    kv = device_kv(dtype=dtype)
    original = kv.clone()
    space = HostSwapSpace(6, BLOCK_SHAPE, dtype)
    out = SwapOp("r", (6, 2, 3), (4, 0, 1))  # non-consecutive on purpose: several copy runs
    assert space.copy_out(kv, out) == 3 * space.block_bytes
    kv[[6, 2, 3]] = 0  # the freed blocks are reused by someone else
    back = SwapOp("r", (1, 7, 0), (4, 0, 1))
    assert space.copy_in(kv, back) == 3 * space.block_bytes
    for dst, src in zip((1, 7, 0), (6, 2, 3)):  # byte-exact: compare the raw bits
        assert torch.equal(kv[dst].view(torch.uint8), original[src].view(torch.uint8))
    untouched = [b for b in range(8) if b not in (1, 7, 0, 6, 2, 3)]
    assert torch.equal(kv[untouched], original[untouched])


def test_swapper_counts_bytes_and_refuses_a_step_that_swaps_both_ways():
    kv = device_kv()
    swapper = Swapper(HostSwapSpace(4, BLOCK_SHAPE, torch.float32), torch.device("cpu"))
    block_bytes = swapper.space.block_bytes
    assert block_bytes == 2 * 2 * 4 * 2 * 8 * 4

    out = SchedulerOutput((), ("a",), swapped_out=(SwapOp("a", (3, 4), (0, 1)),))
    swapper.apply(out, kv, lambda rid: [])
    assert swapper.swapped_out_bytes == 2 * block_bytes and swapper.swapped_in_bytes == 0
    assert torch.equal(swapper.space.storage[:2], kv[3:5])
    both = SchedulerOutput((), ("a",), out.swapped_out, swapped_in=(SwapOp("b", (0,), (2,)),))
    with pytest.raises(AssertionError, match="both swapped out and in"):
        swapper.apply(both, kv, lambda rid: [])


# -- policy object -------------------------------------------------------------------------------

def test_recompute_policy_never_swaps():
    policy = RecomputePreemption()
    assert not policy.swaps and policy.on_preempt(3, 100) is Preempt.RECOMPUTE


def test_swap_policy_swaps_what_fits_and_falls_back_otherwise():
    policy = SwapPreemption(block_bytes=100, swap_bytes_per_step=250)
    assert policy.swaps
    assert policy.on_preempt(3, 3) is Preempt.SWAP
    assert policy.on_preempt(4, 3) is Preempt.FALLBACK
    assert policy.on_preempt(0, 0) is Preempt.RECOMPUTE  # no computed KV: nothing to save


def test_swap_policy_budget_bounds_swap_ins_but_one_always_may():
    policy = SwapPreemption(block_bytes=100, swap_bytes_per_step=250)
    assert policy.may_swap_in(2, 0) and not policy.may_swap_in(1, 2)
    assert policy.may_swap_in(10, 0)  # bigger than the budget: it still comes back alone
    assert SwapPreemption(100, 300).may_swap_in(1, 2)


@pytest.mark.parametrize("kwargs", [dict(block_bytes=0, swap_bytes_per_step=1),
                                    dict(block_bytes=1, swap_bytes_per_step=0)])
def test_swap_policy_validates(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        SwapPreemption(**kwargs)


# -- scheduler with the swap policy (exact ids) -------------------------------------------------

def swap_scheduler(num_blocks, host_blocks=8, budget_bytes=10**9):
    pool = HostBlockPool(host_blocks)
    policy = SwapPreemption(block_bytes=100, swap_bytes_per_step=budget_bytes)
    return Scheduler(BlockManager(num_blocks, 4), 8, 100, preemption=policy, host_pool=pool), pool


def test_victim_keeps_its_computed_tokens_and_comes_back_into_fresh_blocks():
    s, pool = swap_scheduler(6)
    a, b, c = req("a", 8), req("b", 8), req("c", 7)
    for r in (a, b, c):
        s.add(r)
    step(s)  # a -> blocks 0,1; b -> 2,3; c -> 4,5
    out = step(s)  # a needs a 3rd block: c (newest) is swapped out, a and b take its blocks
    assert out.preempted == ("c",) and plan_of(out) == [("a", 1), ("b", 1)]
    assert out.swapped_out == (SwapOp("c", (4, 5), (0, 1)),) and out.swapped_in == ()
    assert c.num_computed_tokens == 7 and c.status is RequestStatus.WAITING and s.swapped == {"c": (0, 1)}
    assert list(s.waiting) == [c] and c.metrics.num_preemptions == 1
    assert s.num_preemptions == s.num_swap_preemptions == 1 and s.num_recompute_fallbacks == 0
    assert s.block_manager.block_table("a") == [0, 1, 4] and pool.num_free_blocks == 6
    out = step(s)  # no free block for c yet: it stays at the head, nothing is swapped
    assert plan_of(out) == [("a", 1), ("b", 1)] and out.swapped_in == () and s.swapped
    s.finish(a, RequestStatus.FINISHED_ABORTED)  # frees 0, 1, 4
    out = step(s)
    assert plan_of(out) == [("b", 1), ("c", 1)]  # c resumes with its 8th token, no recompute
    assert out.swapped_in == (SwapOp("c", (0, 1), (0, 1)),) and s.block_manager.block_table("c") == [0, 1]
    assert s.swapped == {} and pool.num_free_blocks == 8 and c.num_computed_tokens == 8


def two_swapped(budget_bytes):
    """a..d hold 2 blocks each of an 8-block pool; then d and c are swapped out, a and b abort."""
    s, pool = swap_scheduler(8, budget_bytes=budget_bytes)
    rs = [req(x, 8) for x in "abcd"]
    for r in rs:
        s.add(r)
    step(s)
    out = step(s)  # a takes d's blocks; c, then newest, needs one and swaps itself out
    assert out.preempted == ("d", "c") and [op.request_id for op in out.swapped_out] == ["d", "c"]
    assert [r.request_id for r in s.waiting] == ["c", "d"]
    s.finish(rs[0], RequestStatus.FINISHED_ABORTED)
    s.finish(rs[1], RequestStatus.FINISHED_ABORTED)
    return s, pool


def test_swap_ins_beyond_the_step_budget_wait_for_the_next_step():
    s, pool = two_swapped(budget_bytes=250)  # 2 blocks of 100 bytes per step
    out = step(s)
    assert plan_of(out) == [("c", 1)] and [op.request_id for op in out.swapped_in] == ["c"]
    out = step(s)
    assert plan_of(out) == [("c", 1), ("d", 1)] and [op.request_id for op in out.swapped_in] == ["d"]
    assert pool.num_free_blocks == 8


def test_without_a_tight_budget_both_swap_in_in_one_step():
    s, _ = two_swapped(budget_bytes=10**9)
    out = step(s)
    assert [op.request_id for op in out.swapped_in] == ["c", "d"]


def test_full_swap_space_falls_back_to_recompute_and_abort_frees_host_blocks():
    s, pool = swap_scheduler(6, host_blocks=2)
    a, b, c = req("a", 8), req("b", 8), req("c", 7)
    for r in (a, b, c):
        s.add(r)
    step(s)
    pool.allocate(1)  # someone else holds one of the two host blocks: c's 2 blocks no longer fit
    out = step(s)
    assert out.preempted == ("c",) and out.swapped_out == ()
    assert c.num_computed_tokens == 0 and s.num_recompute_fallbacks == 1 and s.num_swap_preemptions == 0
    assert s.swapped == {}
    s2, pool2 = swap_scheduler(6, host_blocks=2)
    for r in (req("a", 8), req("b", 8), c2 := req("c", 7)):
        s2.add(r)
    step(s2)
    step(s2)
    assert s2.swapped == {"c": (0, 1)} and pool2.num_free_blocks == 0
    s2.finish(c2, RequestStatus.FINISHED_ABORTED)
    assert s2.swapped == {} and pool2.num_free_blocks == 2 and not s2.waiting


# -- engine config -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(preemption_mode="swapp"), "preemption_mode must be 'recompute' or 'swap'"),
    (dict(preemption_mode="swap", layer_range=(0, 1)), "whole-model instance"),
    (dict(swap_space_bytes=0), "swap_space_bytes must be a positive integer"),
    (dict(swap_bytes_per_step=-1), "swap_bytes_per_step must be a positive integer"),
])
def test_engine_config_validates_swap_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="m", **kwargs)


# -- engine, tiny model ----------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 45])]
TINY_POOL = dict(num_kv_blocks=16, block_size=4, max_model_len=64, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=128, block_size=4, max_model_len=64)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions == 0
    return [o.outputs[0].token_ids for o in outputs]


def run_counting_tokens(llm, params=GREEDY):
    """Outputs, and the tokens each request ran through the model (recomputation shows up here)."""
    fed: dict[str, int] = {}
    execute = llm.engine.runner.execute

    def counting(plan):
        for chunk in plan.chunks:
            fed[chunk.request.request_id] = fed.get(chunk.request.request_id, 0) + chunk.num_tokens
        return execute(plan)

    llm.engine.runner.execute = counting
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    # without recomputation, a request runs its prompt and every output token but the last once
    recomputed = sum(fed[o.request_id] - (len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1)
                     for o in outputs)
    return outputs, recomputed


def assert_all_returned(engine):
    s = engine.scheduler
    assert s.swapped == {} and s.host_pool.num_free_blocks == s.host_pool.num_blocks
    assert engine.block_manager.num_free_blocks == TINY_POOL["num_kv_blocks"]


def test_recompute_preemption_is_measured_as_recomputed_tokens(llama_dir, reference):
    """The counter the swap tests rely on does see recomputation under the vllm policy."""
    llm = LLM(str(llama_dir), **TINY_POOL)
    outputs, recomputed = run_counting_tokens(llm)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert llm.engine.swapper is None and llm.engine.scheduler.num_preemptions > 0 and recomputed > 0


def test_swap_is_token_exact_and_recomputes_nothing(llama_dir, reference):
    llm = LLM(str(llama_dir), preemption_mode="swap", swap_space_bytes=1 << 20, **TINY_POOL)
    outputs, recomputed = run_counting_tokens(llm)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    engine, s = llm.engine, llm.engine.scheduler
    assert s.num_swap_preemptions == s.num_preemptions > 0 and s.num_recompute_fallbacks == 0
    assert recomputed == 0
    assert sum(o.metrics.num_preemptions for o in outputs) == s.num_preemptions
    snap = engine.snapshot()
    assert snap.swapped_out_bytes > 0 and snap.swapped_in_bytes == snap.swapped_out_bytes  # all came back
    assert snap.swapped_out_bytes % engine.memory.block_bytes == 0
    assert snap.num_swap_preemptions == s.num_swap_preemptions
    assert_all_returned(engine)


def test_tiny_swap_space_falls_back_to_recompute_token_exact(llama_dir, reference):
    block_bytes = LLM(str(llama_dir), **TINY_POOL).engine.memory.block_bytes
    llm = LLM(str(llama_dir), preemption_mode="swap", swap_space_bytes=3 * block_bytes, **TINY_POOL)
    assert llm.engine.scheduler.host_pool.num_blocks == 3
    outputs, recomputed = run_counting_tokens(llm)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    s = llm.engine.scheduler
    assert s.num_recompute_fallbacks > 0 and recomputed > 0
    assert s.num_preemptions == s.num_swap_preemptions + s.num_recompute_fallbacks
    assert_all_returned(llm.engine)


def test_swap_space_smaller_than_a_block_always_recomputes(llama_dir, reference):
    llm = LLM(str(llama_dir), preemption_mode="swap", swap_space_bytes=1, **TINY_POOL)
    outputs, _ = run_counting_tokens(llm)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    s = llm.engine.scheduler
    assert s.num_swap_preemptions == 0 and s.num_recompute_fallbacks == s.num_preemptions > 0
    assert llm.engine.snapshot().swapped_out_bytes == 0


def test_one_byte_step_budget_still_makes_progress_token_exact(llama_dir, reference):
    llm = LLM(str(llama_dir), preemption_mode="swap", swap_bytes_per_step=1, **TINY_POOL)
    outputs, recomputed = run_counting_tokens(llm)
    assert [o.outputs[0].token_ids for o in outputs] == reference and recomputed == 0
    assert llm.engine.scheduler.num_swap_preemptions > 0
    assert_all_returned(llm.engine)


def test_seeded_sampling_matches_the_unconstrained_run(llama_dir):
    """Swapping keeps each request's generator state: no sample is drawn twice or skipped."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    expected = LLM(str(llama_dir), num_kv_blocks=128, block_size=4, max_model_len=64).generate(
        PROMPTS, params, use_tqdm=False)
    llm = LLM(str(llama_dir), preemption_mode="swap", swap_space_bytes=1 << 20, **TINY_POOL)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.scheduler.num_swap_preemptions > 0


def test_serve_refuses_swap_with_pipelines():
    from kunserve import serve

    with pytest.raises(SystemExit, match="--policy swap swaps whole-model instances only"):
        serve.main(["--model", "unused", "--policy", "swap", "--pipeline-size", "2"])


# -- CUDA (run through the device tool; skipped on CPU-only machines) ---------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_swapper_copies_before_the_forward_overwrites_freed_blocks():
    """A swap-out's blocks are rewritten on the compute stream right after ``apply``: the copy on
    the side stream must still see the old bytes, and the swap-in must land before a read.
    Blocks of 1 MiB make the race real: without the forward's wait, 17 of 20 runs on an H100
    read overwritten bytes."""
    shape, n = (8, 2, 16, 8, 128), 256  # [layers, 2, block_size, kv_heads, head_dim], 1 MiB blocks

    class Chunk:  # the forward of the step runs request "b"
        class request:
            request_id = "b"

    for _ in range(3):
        kv = torch.randn((n, *shape), device="cuda")
        original = kv.clone()
        swapper = Swapper(HostSwapSpace(n, shape, torch.float32, pin_memory=True), torch.device("cuda"))
        evens, host = tuple(range(0, n, 2)), tuple(range(n // 2))
        out = SchedulerOutput((Chunk,), ("a",), swapped_out=(SwapOp("a", evens, host),))
        swapper.apply(out, kv, lambda rid: list(range(0, n, 2)))  # b now owns a's blocks
        kv.fill_(-1.0)  # "the forward" writes every block on the compute stream
        torch.cuda.synchronize()
        assert torch.equal(swapper.space.storage[:n // 2], original[0::2].cpu())
        back = SchedulerOutput((Chunk,), swapped_in=(SwapOp("b", tuple(range(1, n, 2)), host),))
        swapper.apply(back, kv, lambda rid: list(range(1, n, 2)))
        gathered = kv[1::2].clone()  # a compute-stream read right after apply
        torch.cuda.synchronize()
        assert torch.equal(gathered, original[0::2])
        assert swapper.swapped_out_bytes == swapper.swapped_in_bytes == n // 2 * swapper.space.block_bytes


@cuda
@pytest.mark.parametrize("eager", [False, True])
def test_cuda_swap_is_token_exact(llama_dir, eager):
    common = dict(device="cuda", dtype="float32", enforce_eager=eager)
    expected = LLM(str(llama_dir), num_kv_blocks=128, block_size=4, max_model_len=64, **common).generate(
        PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(str(llama_dir), preemption_mode="swap", swap_space_bytes=1 << 20, **TINY_POOL, **common)
    assert llm.engine.swapper.stream is not None and llm.engine.swapper.space.storage.is_pinned()
    outputs, recomputed = run_counting_tokens(llm)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.scheduler.num_swap_preemptions > 0 and recomputed == 0
    assert_all_returned(llm.engine)
