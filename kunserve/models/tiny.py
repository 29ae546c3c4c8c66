"""Tiny random Hugging Face checkpoints, generated locally: the built-in default model.

``make_tiny_checkpoint`` writes a real checkpoint directory (config.json, safetensors weights,
tokenizer.json with a chat template) through transformers' own ``save_pretrained``, so the
demo, the tests and the benchmarks run without any download.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A serving cluster runs several instances of one model.",
    "Under a burst the KV cache fills and new requests wait in the queue.",
    "Dropping replicated weights frees memory for the cache at once.",
    "Pipeline stages pass hidden states from one GPU to the next.",
    "Hello, how are you today? I am fine, thank you very much.",
    "Once upon a time there was a small language model that loved numbers 0123456789.",
]

_ARCH_CONFIGS = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}


def train_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in milliseconds on a built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_hf_config(architecture: str = "LlamaForCausalLM", vocab_size: int = 384, **overrides):
    import transformers

    if architecture not in _ARCH_CONFIGS:
        raise ValueError(f"no tiny config for {architecture!r}; choose from {sorted(_ARCH_CONFIGS)}")
    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if architecture == "Qwen3ForCausalLM":
        fields["head_dim"] = 16
    fields.update(overrides)
    return getattr(transformers, _ARCH_CONFIGS[architecture])(**fields)


def make_tiny_checkpoint(
    path: str | Path, architecture: str = "LlamaForCausalLM", seed: int = 0,
    dtype: torch.dtype = torch.float32, with_tokenizer: bool = True, **config_overrides,
) -> Path:
    """Write a random ``architecture`` checkpoint (and tokenizer) to ``path``; returns it."""
    import transformers

    path = Path(path)
    tokenizer = train_tiny_tokenizer() if with_tokenizer else None
    vocab = len(tokenizer) if tokenizer is not None else config_overrides.pop("vocab_size", 384)
    config = tiny_hf_config(architecture, vocab_size=vocab, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(dtype)
    _spread_weights(model)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _spread_weights(model: torch.nn.Module) -> None:
    """HF's default init (std 0.02) makes near-uniform logits in a tiny model, where greedy ties
    depend on rounding. Larger weights give confident, diverse next tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.12)
