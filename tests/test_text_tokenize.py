"""Char and byte-level BPE tokenizers: exact round trips, unknown characters, spans, save/load."""

from __future__ import annotations

import re

import pytest

from anchoring.domains.text.tokenize import UNKNOWN_CHAR, BPETokenizer, CharTokenizer, load_tokenizer, train_tokenizer
from anchoring.errors import AnchoringError

TRAIN = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,"] * 20
UNSEEN = "Ōthello — naïve café 日本語 😀 end"


def test_char_round_trip_unknown_and_spans(tmp_path):
    tok = CharTokenizer.train(TRAIN)
    text = "To be the question"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set("".join(TRAIN))) + 1
    ids = tok.encode("béZ😀")
    assert ids[1] == 0 and ids[3] == 0 and ids[0] != 0
    assert tok.decode(ids) == f"b{UNKNOWN_CHAR}{UNKNOWN_CHAR}{UNKNOWN_CHAR}"  # 'Z' was never seen either
    assert tok.spans("abc") == [(0, 1), (1, 2), (2, 3)]
    tok.save(tmp_path / "char.json")
    again = load_tokenizer(tmp_path / "char.json")
    assert again.encode(UNSEEN) == tok.encode(UNSEEN)


def test_the_replacement_character_and_lone_surrogates_are_unknown_not_errors():
    """U+FFFD is what unknown ids decode to, so it is never a vocabulary entry; a lone surrogate is
    what Python makes of invalid UTF-8 in a command-line argument, and must not crash either tokenizer."""
    tok = CharTokenizer.train([f"a{UNKNOWN_CHAR}b"])
    assert tok.chars == "ab" and tok.encode(UNKNOWN_CHAR) == [0]
    assert tok.encode("a\udcffb") == [1, 0, 2]
    bpe = BPETokenizer.train(TRAIN, vocab_size=300)
    assert bpe.encode("a\udcffb") == bpe.encode(f"a{UNKNOWN_CHAR}b")
    assert bpe.spans("a\udcffb") == bpe.spans(f"a{UNKNOWN_CHAR}b")  # one character for one: places kept


def test_bpe_round_trip_unseen_unicode_and_spans(tmp_path):
    tok = BPETokenizer.train(TRAIN, vocab_size=300)
    assert 256 <= tok.vocab_size <= 300
    for text in (TRAIN[0], UNSEEN, "  two  spaces\n\nand\ttab\r\n"):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(UNSEEN)
    spans = tok.spans(UNSEEN)
    assert len(spans) == len(ids)
    assert all(0 <= s < e <= len(UNSEEN) for s, e in spans)  # character offsets, not byte offsets
    covered = {i for s, e in spans for i in range(s, e)}
    assert covered == set(range(len(UNSEEN)))
    k = UNSEEN.index("日")
    assert sum(1 for s in spans if s == (k, k + 1)) >= 2  # 3 UTF-8 bytes, unseen: several tokens share its span
    assert len(tok.encode(TRAIN[0])) < len(TRAIN[0])  # merges were learned
    tok.save(tmp_path / "bpe.json")
    again = load_tokenizer(tmp_path / "bpe.json")
    assert again.encode(UNSEEN) == ids and again.decode(ids) == UNSEEN


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(AnchoringError):
        train_tokenizer("words", TRAIN)
    with pytest.raises(AnchoringError):
        BPETokenizer.train(TRAIN, vocab_size=100)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(AnchoringError):
        load_tokenizer(tmp_path / "bad.json")
    # a damaged body of a known kind is one line too, not a KeyError or the tokenizers library's exception
    for body, message in (('{"kind": "char"}', "no 'chars'"), ('{"kind": "bpe", "tokenizer": {"model": 3}}', "(bpe)")):
        (tmp_path / "damaged.json").write_text(body)
        with pytest.raises(AnchoringError, match=re.escape(message)):
            load_tokenizer(tmp_path / "damaged.json")


def test_characters_beyond_the_basic_plane_keep_their_own_ids():
    tok = CharTokenizer.train(["the moon 🌙 and 𝄞 music"])
    ids = tok.encode("🌙𝄞x")
    assert ids[0] != 0 and ids[1] != 0 and ids[0] != ids[1] and ids[2] == 0  # x never seen: the unknown id
    assert tok.decode(ids[:2]) == "🌙𝄞"
