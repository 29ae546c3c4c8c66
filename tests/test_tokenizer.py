"""IncrementalDetokenizer: after every token, the text equals a full decode of the output so far.

Three tokenizer families, all built offline: the tiny checkpoints' byte-level BPE (multi-byte
characters split across tokens: U+FFFD windows), a word-level one whose decode joins words with
spaces and applies transformers' clean-up rules (" ." -> "."), and a Metaspace (SentencePiece
style: "▁" marks a word start, the first one's space is dropped) BPE with byte fallback.
"""

from __future__ import annotations

import random

import pytest

from kunserve.models.tiny import train_tiny_tokenizer
from kunserve.tokenizer import IncrementalDetokenizer

CORPUS = ["Héllo wörld, ça va? 東京 タワー 🚀 rocket.", "don't stop . , ! ?  double  spaces", "naïve café 🙂 emoji"] * 20


def byte_level():
    return train_tiny_tokenizer()


def word_level():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world", ".", ",", "?", "!", "'s", "n't", "do", "it", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=True)


def metaspace():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("make", [byte_level, word_level, metaspace])
@pytest.mark.parametrize("skip_special", [True, False])
def test_every_step_equals_a_full_decode(make, skip_special):
    tokenizer = make()
    rng = random.Random(0)
    texts = CORPUS[:3] + ["hello world . do n't ! a , it 's ?"]
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    vocab = len(tokenizer)
    sequences += [[rng.randrange(vocab) for _ in range(60)] for _ in range(20)]  # any ids, special ones too
    for ids in sequences:
        detok = IncrementalDetokenizer(tokenizer, skip_special)
        for n in range(1, len(ids) + 1):
            assert detok.update(ids[:n]) == tokenizer.decode(ids[:n], skip_special_tokens=skip_special), (ids, n)


def test_several_tokens_at_once_and_a_restart():
    tokenizer = byte_level()
    ids = tokenizer.encode("🚀 東京 ça va, naïve café", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for n in (2, 3, 7, len(ids)):  # any number of new tokens per update
        assert detok.update(ids[:n]) == tokenizer.decode(ids[:n], skip_special_tokens=True)
    assert detok.update(ids[:4]) == tokenizer.decode(ids[:4], skip_special_tokens=True)  # not a continuation


def test_decodes_a_window_not_the_whole_output():
    """What makes it incremental: after the first tokens, each update decodes a bounded window."""
    tokenizer = byte_level()
    lengths = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(" ".join(CORPUS[:3]) * 4, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting())
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
    assert len(ids) > 200 and max(lengths[-40:]) <= 8
