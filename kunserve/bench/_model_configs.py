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

MODEL_CONFIGS = {"llama3-8b": LLAMA3_8B}


def write_model_config(name: str, directory: str | Path | None = None) -> Path:
    """Write the named config.json into ``directory`` (default: a new temporary one); returns it."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(MODEL_CONFIGS)}")
    path = Path(directory or tempfile.mkdtemp(prefix=f"kunserve-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODEL_CONFIGS[name], indent=2))
    return path
