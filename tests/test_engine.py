"""The offline engine end to end: greedy tokens identical to transformers.generate."""

from __future__ import annotations

import pytest

from conftest import ARCHITECTURES, hf_greedy, hf_model
from kunserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# 9 prompts of different lengths, 2 to 45 tokens
PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(n)] for i, n in enumerate([2, 3, 5, 8, 13, 17, 24, 31, 45])]


def assert_matches_transformers(llm, path, arch, prompts=PROMPTS, params=GREEDY):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reference = hf_model(path, arch)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, params.max_tokens), prompt
    return outputs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(tiny_checkpoints, arch):
    llm = LLM(str(tiny_checkpoints[arch]), num_kv_blocks=64, block_size=16, max_model_len=128)
    outputs = assert_matches_transformers(llm, tiny_checkpoints[arch], arch)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert llm.engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_with_tiny_pool_chunking_and_preemption(tiny_checkpoints, arch):
    llm = LLM(str(tiny_checkpoints[arch]), num_kv_blocks=16, block_size=4, max_model_len=64,
              max_num_batched_tokens=16)
    outputs = assert_matches_transformers(llm, tiny_checkpoints[arch], arch)
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outputs) == llm.engine.scheduler.num_preemptions
    assert llm.engine.block_manager.num_free_blocks == 16  # every block came back


def test_text_prompts_detokenize_and_record_timing(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    tok = llm.get_tokenizer()
    outputs = llm.generate(["Hello, how are you", "The quick brown fox"], GREEDY, use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert out.prompt_token_ids == tok.encode(out.prompt)
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert len(m.token_times) == len(completion.token_ids) == 12
        assert m.token_times == sorted(m.token_times) and m.token_times[0] == m.first_token_time


def test_stop_strings_truncate_text(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    full = llm.generate("The quick brown fox", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = full.text[4:7]
    assert stop and stop in full.text
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    out = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 12


def test_stop_token_ids_and_max_model_len(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=40)
    prompt = PROMPTS[4]
    full = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[full[3]], ignore_eos=True)
    stopped = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full[: full.index(full[3]) + 1] and stopped.finish_reason == "stop"
    long_prompt = PROMPTS[7]  # 31 tokens: only 9 fit under max_model_len 40
    capped = llm.generate([long_prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert len(capped.token_ids) == 9 and capped.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_batch(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0].token_ids
    batched = llm.generate([PROMPTS[1], PROMPTS[3]], [GREEDY, params], use_tqdm=False)[1].outputs[0].token_ids
    assert alone == batched
    other = llm.generate([PROMPTS[3]], SamplingParams(temperature=0.8, seed=99, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone


def test_chat_applies_template(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    expected = llm.get_tokenizer().encode("<|user|>Hello</s><|assistant|>")
    assert out.prompt_token_ids == expected and len(out.outputs[0].token_ids) == 12


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ([], GREEDY, "prompt 1: the prompt is empty"),
        ("", GREEDY, "prompt 1: the prompt is empty"),
        (list(range(1, 130)), GREEDY, "129 tokens but max_model_len is 128; shorten the prompt to at most 127"),
        ([1, 99999], GREEDY, r"outside the vocabulary"),
    ],
)
def test_bad_prompt_raises_and_engine_keeps_working(llama_dir, prompt, params, message):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPTS[0], prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing half-added
    assert len(llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"temperature": -0.5}, r"temperature must be >= 0 \(0 means greedy\), got -0.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -3}, "top_k must be -1 or 0"),
        ({"n": 2}, "n=2 is not supported"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_request_while_others_run_leaves_them_intact(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)]
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:3]]
    engine.step()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(PROMPTS[0], GREEDY, request_id=ids[0])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[i].outputs[0].token_ids for i in ids] == expected


def test_abort_frees_blocks(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, max_model_len=128)
    engine = llm.engine
    rid = engine.add_request(PROMPTS[5], GREEDY)
    engine.step()
    out = engine.abort_request(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == 64 and not engine.has_unfinished_requests()


def test_engine_rejects_unknown_args_and_too_small_cache(llama_dir):
    with pytest.raises(ValueError, match=r"unknown engine argument\(s\) \['gpu_util'\]"):
        LLM(str(llama_dir), gpu_util=0.5)
    with pytest.raises(ValueError, match="fewer than max_model_len .512.; lower max_model_len"):
        LLM(str(llama_dir), num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="load_format must be"):
        LLM(str(llama_dir), load_format="pt")


def test_dummy_load_format_runs_without_weights(llama_dir, tmp_path):
    import shutil

    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", num_kv_blocks=64, max_model_len=128)
    out = llm.generate([PROMPTS[2]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].text == ""  # no tokenizer: ids only
    with pytest.raises(ValueError, match="no tokenizer, so prompts must be token-id lists"):
        llm.generate("hello", GREEDY, use_tqdm=False)
