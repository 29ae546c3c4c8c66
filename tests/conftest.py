"""Shared fixtures: tiny random Hugging Face checkpoints written with transformers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def hf_model(path, architecture):
    import transformers

    return getattr(transformers, architecture).from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """architecture -> directory of a tiny random fp32 checkpoint with tokenizer."""
    from kunserve.models.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(root / arch, arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(scope="session")
def llama_dir(tiny_checkpoints):
    return tiny_checkpoints["LlamaForCausalLM"]
