"""Tokenizer loading and detokenization (transformers' fast tokenizers)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path):
    """The model directory's tokenizer, or None when it has none (token-id prompts only)."""
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        log.info("no tokenizer files in %s: only token-id prompts are accepted", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def find_stop_string(text: str, stops: tuple[str, ...], new_text_start: int) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newly added text: (index where it starts, stop).

    Only text from ``new_text_start - len(stop) + 1`` on is searched, so each step costs the new
    text, not the whole output.
    """
    best = None
    for stop in stops:
        at = text.find(stop, max(0, new_text_start - len(stop) + 1))
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best
