"""Model forward passes against transformers (fp32 logits within 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHITECTURES, hf_model
from kunserve.models import ModelConfig, build_model, load_safetensors, supported_architectures
from kunserve.models.tiny import make_tiny_checkpoint
from kunserve.runtime.attention import AttentionMetadata
from kunserve.runtime.kv_cache import PagedKVCache

BLOCK = 4


def load_stage(path, layer_range=None):
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = build_model(cfg, layer_range)
    load_safetensors(model, path, torch.float32, torch.device("cpu"))
    return model.eval(), cfg


def run_chunks(model, cfg, tokens: list[int], chunk_sizes: list[int]) -> torch.Tensor:
    """Feed ``tokens`` through the paged path in chunks; logits of every position [n, vocab]."""
    cache = PagedKVCache.allocate(32, model.layer_ids, BLOCK, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    table = list(range(31, 0, -1))  # deliberately non-contiguous, descending block ids
    logits, done = [], 0
    for size in chunk_sizes:
        meta = AttentionMetadata.build([size], [done + size], [table], BLOCK, torch.device("cpu"))
        with torch.inference_mode():
            hidden = model(torch.tensor(tokens[done:done + size]), torch.arange(done, done + size),
                           cache.by_layer(), meta)
            logits.append(model.compute_logits(hidden))
        done += size
    return torch.cat(logits)


def hf_logits(path, arch, tokens):
    with torch.inference_mode():
        return hf_model(path, arch)(torch.tensor([tokens])).logits[0].float()


PROMPT = [1, 17, 42, 99, 7, 3, 250, 12, 18, 64, 5, 200, 31, 77, 8, 2, 150, 9, 11, 301, 44]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_logits_match_transformers(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    model, cfg = load_stage(path)
    ours = run_chunks(model, cfg, PROMPT, [len(PROMPT)])
    assert (ours - hf_logits(path, arch, PROMPT)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_and_decode_logits_match(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    model, cfg = load_stage(path)
    ours = run_chunks(model, cfg, PROMPT, [5, 7, 6, 1, 1, 1])  # chunks, then decode steps
    assert (ours - hf_logits(path, arch, PROMPT)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("LlamaForCausalLM", {"tie_word_embeddings": True}),
        ("LlamaForCausalLM", {"num_key_value_heads": 1}),
        ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}),
        ("MistralForCausalLM", {"sliding_window": 6}),
        ("Qwen3ForCausalLM", {"tie_word_embeddings": True}),
        ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    ],
    ids=["tied", "mqa", "llama3-rope", "sliding-window", "qwen3-tied", "llama-bias"],
)
def test_variants_match_transformers(tmp_path, arch, overrides):
    path = make_tiny_checkpoint(tmp_path / "m", arch, **overrides)
    model, cfg = load_stage(path)
    ours = run_chunks(model, cfg, PROMPT, [9, 12])
    assert (ours - hf_logits(path, arch, PROMPT)).abs().max() <= 1e-4


def test_transformers4_style_config(tmp_path):
    """rope_theta / rope_scaling / torch_dtype keys (transformers 4) load the same model."""
    path = make_tiny_checkpoint(
        tmp_path / "m", "LlamaForCausalLM",
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    expected = hf_logits(path, "LlamaForCausalLM", PROMPT)
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    raw["torch_dtype"] = raw.pop("dtype")
    (path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_dir(path)
    assert cfg.rope.rope_type == "llama3" and cfg.rope.theta == 50000.0 and cfg.dtype == torch.float32
    model, cfg = load_stage(path)
    assert (run_chunks(model, cfg, PROMPT, [len(PROMPT)]) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("split", [1, 2, 3])
def test_pipeline_stages_compose_to_full_model(llama_dir, split):
    full, cfg = load_stage(llama_dir)
    first, _ = load_stage(llama_dir, (0, split))
    second, _ = load_stage(llama_dir, (split, cfg.num_layers))
    assert first.lm_head is None and first.model.norm is None and first.model.embed_tokens is not None
    assert second.model.embed_tokens is None and second.lm_head is not None
    assert set(first.state_dict()) | set(second.state_dict()) == set(full.state_dict())
    meta = AttentionMetadata.build([len(PROMPT)], [len(PROMPT)], [list(range(8))], BLOCK, torch.device("cpu"))
    caches = [PagedKVCache.allocate(8, m.layer_ids, BLOCK, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
              for m in (full, first, second)]
    ids, pos = torch.tensor(PROMPT), torch.arange(len(PROMPT))
    with torch.inference_mode():
        expected = full(ids, pos, caches[0].by_layer(), meta)
        hidden = first(ids, pos, caches[1].by_layer(), meta)
        got = second(hidden, pos, caches[2].by_layer(), meta)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_unknown_architecture_lists_supported(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", "LlamaForCausalLM", with_tokenizer=False)
    raw = json.loads((path / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM, MistralForCausalLM"):
        build_model(ModelConfig.from_dir(path))
    assert supported_architectures() == sorted(ARCHITECTURES)


def test_bad_layer_range_is_rejected(llama_dir):
    cfg = ModelConfig.from_dir(llama_dir)
    with pytest.raises(ValueError, match="layer_range"):
        build_model(cfg, (2, 2))
