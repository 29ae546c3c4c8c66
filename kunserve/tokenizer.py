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



class IncrementalDetokenizer:
    """The text of one request's growing output, decoding a few tokens per step instead of the
    whole output (``tokenizer.decode`` of n tokens costs O(n), ~38 us at 128 tokens: decoding
    every running request whole each step grows with the output length).

    As vLLM and TGI do: the tokens ``[prefix_offset, read_offset)`` are already text and stay as
    left context, so word-boundary spaces and clean-up rules see what precedes the new tokens;
    an update decodes ``[prefix_offset, len)`` and appends what extends the context's text. A
    window ending in U+FFFD (an incomplete UTF-8 character of byte-level BPE) is returned but not
    committed until its last byte arrives. Where the context's text is not a prefix of the
    window's (a clean-up rule rewrote the boundary), the whole output is decoded once instead.

    Invariant: ``text`` == decode(ids[:read_offset]); ``update`` returns decode(ids), checked
    step by step against a full decode in tests/test_tokenizer.py.
    """

    CONTEXT_TOKENS = 4  # left context kept after a full decode

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.text = ""
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, ids: list[int]) -> str:
        """The text of ``ids``: the list seen before, grown by any number of tokens."""
        if len(ids) == self.read_offset:
            return self.text
        if len(ids) < self.read_offset:
            return self._decode_whole(ids)
        context = self._decode(ids[self.prefix_offset:self.read_offset])
        window = self._decode(ids[self.prefix_offset:])
        if not window.startswith(context):
            return self._decode_whole(ids)
        new = window[len(context):]
        if new and not new.endswith("\ufffd"):
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return self.text
        return self.text + new

    def _decode_whole(self, ids: list[int]) -> str:
        text = self._decode(ids)
        if text.endswith("\ufffd"):  # commit nothing past a partial character: start over later
            self.text, self.prefix_offset, self.read_offset = "", 0, 0
            return text
        self.text, self.read_offset = text, len(ids)
        self.prefix_offset = max(0, len(ids) - self.CONTEXT_TOKENS)
        return text
