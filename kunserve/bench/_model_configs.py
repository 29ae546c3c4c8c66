"""Built-in model shapes for benchmarks with dummy weights: a directory with only config.json."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# Meta-Llama-3-8B's config.json (architecture fields only; no tokenizer, no weights).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}

# Qwen2.5-14B and Qwen2.5-72B (Qwen/Qwen2.5-*-Instruct config.json, architecture fields): the
# paper's two models; the simulator (kunserve.sim) sizes memory and step time from these.
QWEN25_14B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

QWEN25_72B = {
    **QWEN25_14B,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

MODEL_CONFIGS = {"llama3-8b": LLAMA3_8B, "qwen2.5-14b": QWEN25_14B, "qwen2.5-72b": QWEN25_72B}


def write_model_config(name: str, directory: str | Path | None = None) -> Path:
    """Write the named config.json into ``directory`` (default: a new temporary one); returns it."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(MODEL_CONFIGS)}")
    path = Path(directory or tempfile.mkdtemp(prefix=f"kunserve-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODEL_CONFIGS[name], indent=2))
    return path


def write_dummy_model(name: str, directory: str | Path) -> Path:
    """``config.json`` of the named shape plus a word-level tokenizer over its whole vocabulary
    (every random token decodes to one word, so a streaming client sees one text delta per
    token): what ``kunserve.serve --load-format dummy`` serves with random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = write_model_config(name, directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, MODEL_CONFIGS[name]["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path
