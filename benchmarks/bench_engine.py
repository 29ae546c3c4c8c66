"""CPU engine benchmarks: generation throughput of the tiny model, scheduler step overhead."""

from __future__ import annotations

from kunserve import LLM, SamplingParams
from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.request import Request
from kunserve.runtime.scheduler import Scheduler

NUM_PROMPTS, PROMPT_LEN, OUTPUT_LEN = 64, 32, 32


def test_tiny_model_generate_throughput(benchmark, tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=512, block_size=16, max_model_len=256)
    prompts = [[1 + (i * 13 + j) % 300 for j in range(PROMPT_LEN)] for i in range(NUM_PROMPTS)]
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    outputs = benchmark.pedantic(lambda: llm.generate(prompts, params, use_tqdm=False), rounds=3, warmup_rounds=1)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == NUM_PROMPTS * OUTPUT_LEN
    if not benchmark.disabled:
        median = benchmark.stats.stats.median
        benchmark.extra_info["output_tokens_per_s"] = tokens / median
        benchmark.extra_info["total_tokens_per_s"] = NUM_PROMPTS * (PROMPT_LEN + OUTPUT_LEN) / median


def _loaded_scheduler(num_queued: int) -> Scheduler:
    """256 running decodes plus ``num_queued`` waiting requests that cannot be admitted."""
    scheduler = Scheduler(BlockManager(num_blocks=8192, block_size=16), max_num_seqs=256,
                          max_num_batched_tokens=8192)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(256 + num_queued):
        scheduler.add(Request(str(i), list(range(1, 33)), params, max_total_tokens=20_000))
    out = scheduler.schedule()
    scheduler.update(out, {c.request.request_id: 5 for c in out.chunks})
    return scheduler


def test_scheduler_step_overhead_with_1000_queued(benchmark):
    scheduler = _loaded_scheduler(1000)
    assert len(scheduler.running) == 256 and len(scheduler.waiting) == 1000

    def one_step():
        out = scheduler.schedule()
        scheduler.update(out, {c.request.request_id: 5 for c in out.chunks})
        return out

    # 200 steps grow each request by 200 tokens: the pool (8192 blocks) never runs out.
    out = benchmark.pedantic(one_step, rounds=200, warmup_rounds=5)
    assert len(out.chunks) == 256  # every running request decodes; the queue waits on max_num_seqs
    assert scheduler.num_preemptions == 0


def _detokenize_outputs(outputs: list[list[int]], decode_step) -> None:
    """The engine's text work while ``outputs`` grow one token per request per step, each
    request's token list growing in place as ``Request.output_token_ids`` does."""
    grown = [[] for _ in outputs]
    for n in range(len(outputs[0])):
        for i, ids in enumerate(grown):
            ids.append(outputs[i][n])
            decode_step(i, ids)


def test_detokenize_256_outputs_of_128_tokens_full_vs_incremental(benchmark, tiny_llama):
    """Per-step text of 256 running requests: a full decode of each output (what the engine did
    before) against IncrementalDetokenizer. extra_info: ms per engine step for each."""
    import time

    from kunserve.tokenizer import IncrementalDetokenizer, load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    outputs = [[3 + (i * 7 + 11 * j) % 370 for j in range(128)] for i in range(256)]
    full_texts = {}

    def full(i, ids):
        full_texts[i] = tokenizer.decode(ids, skip_special_tokens=True)

    start = time.perf_counter()
    _detokenize_outputs(outputs, full)
    full_ms = (time.perf_counter() - start) / 128 * 1e3

    def incremental_run():
        detokenizers = [IncrementalDetokenizer(tokenizer) for _ in range(256)]
        texts = {}

        def step(i, ids):
            texts[i] = detokenizers[i].update(ids)

        _detokenize_outputs(outputs, step)
        return texts

    texts = benchmark.pedantic(incremental_run, rounds=3, warmup_rounds=0)
    assert texts == full_texts  # the same text, token for token
    if not benchmark.disabled:
        benchmark.extra_info["full_decode_ms_per_step"] = full_ms
        benchmark.extra_info["incremental_ms_per_step"] = benchmark.stats.stats.median / 128 * 1e3
