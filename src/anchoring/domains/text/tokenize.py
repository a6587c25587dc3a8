"""Tokenizers with one small interface: encode, decode, character spans per token, save/load.

Spans matter because labels live on characters (the words a labelling function fired on);
a model sees tokens, so each token must say which characters it covers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError

UNKNOWN_CHAR = "\ufffd"  # what the unknown id decodes to (U+FFFD REPLACEMENT CHARACTER)


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spans(self, text: str) -> list[tuple[int, int]]: ...
    def dumps(self) -> str:
        """Everything that decides the encoding, as the text `save` writes."""
        ...

    def save(self, path: Path) -> None: ...


class CharTokenizer:
    """One id per character seen in training; id 0 is reserved for every other character.

    Round trip is exact for text whose characters were all seen; an unseen character encodes to
    0 and decodes to U+FFFD, so `decode(encode(t))` has the same length as `t` and spans stay 1:1.
    """

    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or UNKNOWN_CHAR in chars:
            raise AnchoringError("character vocabulary must list distinct characters and not U+FFFD")
        self.chars = chars
        self.vocab_size = len(chars) + 1
        self._index = {c: i + 1 for i, c in enumerate(chars)}
        self._table = np.zeros(0x10000, dtype=np.int32)  # fast path for the Basic Multilingual Plane
        cps = np.array([ord(c) for c in chars if ord(c) < 0x10000], dtype=np.int64)
        self._table[cps] = [self._index[chr(c)] for c in cps]
        self._wide = {c: i for c, i in self._index.items() if ord(c) >= 0x10000}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        seen.discard(UNKNOWN_CHAR)
        return cls("".join(sorted(seen)))

    def encode_array(self, text: str) -> np.ndarray:
        """Ids as an int32 array (vectorised: the whole corpus encodes in well under a second)."""
        # a lone surrogate (what Python makes of invalid UTF-8 in a command-line argument) is a code
        # point like any other here: not in the vocabulary, so the unknown id
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        bmp = cps < 0x10000
        ids = np.zeros(len(cps), dtype=np.int32)
        ids[bmp] = self._table[cps[bmp]]
        for k in np.flatnonzero(~bmp):
            ids[k] = self._wide.get(chr(cps[k]), 0)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i - 1] if 0 < i <= len(chars) else UNKNOWN_CHAR for i in ids)

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(len(text))]

    def dumps(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False)

    def save(self, path: Path) -> None:
        write_atomic(Path(path), self.dumps())


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate (invalid UTF-8 from a command line) as U+FFFD, one character
    for one, so spans keep their places; `tokenizers` refuses such a string outright."""
    return _SURROGATE.sub(UNKNOWN_CHAR, text)


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library: any text round-trips exactly, seen or not.

    Unknown characters fall back to their UTF-8 bytes (all 256 are in the base alphabet), so there
    is no unknown token. Offsets from `tokenizers` are in characters; when a multi-byte character
    is cut over several tokens each of those tokens reports that whole character's span, so spans
    of neighbouring tokens can coincide or overlap.
    """

    kind = "bpe"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 260:
            raise AnchoringError(f"bpe_vocab must be ≥ 260 (256 bytes + merges), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False, special_tokens=[])
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_no_lone_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [tuple(o) for o in self._tok.encode(_no_lone_surrogates(text), add_special_tokens=False).offsets]

    def dumps(self) -> str:
        return json.dumps({"kind": "bpe", "tokenizer": json.loads(self._tok.to_str())})

    def save(self, path: Path) -> None:
        write_atomic(Path(path), self.dumps())


def load_tokenizer(path: Path) -> CharTokenizer | BPETokenizer:
    """Read what `save` wrote: a resumed run gets the same vocabulary / merges."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        kind = data["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnchoringError(f"cannot read tokenizer {path}: {e}") from None
    if kind not in ("char", "bpe"):
        raise AnchoringError(f"tokenizer {path}: unknown kind {kind!r}")
    try:
        if kind == "char":
            return CharTokenizer(data["chars"])
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["tokenizer"])))
    except Exception as e:  # a missing field, or whatever the tokenizers library says of a damaged body
        what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AnchoringError(f"cannot read tokenizer {path} ({kind}): {what}") from None


def train_tokenizer(kind: str, texts: list[str], bpe_vocab: int = 1024) -> CharTokenizer | BPETokenizer:
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, bpe_vocab)
    raise AnchoringError(f"tokenizer must be char or bpe, not {kind!r}")
