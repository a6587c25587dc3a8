"""The text an LM run trains and is measured on: passages, split, tokens, labels, and the batch stream.

**Batches.** For each seed, epoch e is a seeded permutation of *all* training passages
(`default_rng([seed, e, BATCH_SALT])`), each passage followed by a blank line; a filtered arm drops
the passages it removes from that same permutation. The surviving passages are concatenated into
one token stream, and step s takes windows s·B … s·B+B−1 of `window+1` tokens at stride `window`.
So every arm of a seed sees the passages in the same order; an arm that removes nothing sees the
very same batches, and a filtered arm sees the same sequence with its removed passages cut out
(it therefore reaches later passages a little sooner, and every step still has B full windows —
no padding, the same tokens per step in every arm).

**Labels.** The weak training labels are a fixed per-seed set, `weak_set(reference, coverage,
false_positives, seed)` over the training passages: identical in every arm of a seed, and every
process. Within a window, each passage's positions form one "line" for `pool_lines`; a passage
cut by the window edge is still a line (its visible part).

With `text.weak_labels = "spans"` a weak label marks positions, not passages: the tokens of a
weakly labelled passage that overlap a word where the labeller fired (`concept_spans`) or one of
the `span_after` characters after it — the rule of an evaluation *concept position*, whose extent
is its own key (`evaluate.after`), so that runs differing in `span_after` are scored alike.
`Batch.labels` then carries these per-position labels; with "passages" it carries every
position's passage label.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anchoring.atomic import write_atomic
from anchoring.domains.text.config import TextConfig
from anchoring.domains.text.corpus import load_corpus
from anchoring.domains.text.labelling import Passages, concept_spans
from anchoring.domains.text.split import split_indices
from anchoring.domains.text.tokenize import BPETokenizer, CharTokenizer, train_tokenizer
from anchoring.domains.text.weak import reference_labels, weak_set
from anchoring.errors import AnchoringError

SEPARATOR = "\n\n"  # appended to every passage: the model sees where one passage ends
BATCH_SALT = 0xBA7C
TOKENIZER = "tokenizer.json"
CORPUS = "corpus.json"  # a fingerprint of the passages, split and reference labels the run trained on


@dataclass
class LMData:
    """One corpus, split, tokenized and labelled; shared by every arm and seed of a run."""

    text: TextConfig
    texts: list[str]
    parts: dict[str, np.ndarray]  # corpus indices per split
    reference: np.ndarray  # 0/1 per corpus passage: the best labeller (ground truth)
    tokenizer: CharTokenizer | BPETokenizer
    train_tokens: list[np.ndarray] = field(default_factory=list)  # per training passage (with separator)
    _spans: list[np.ndarray] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> np.ndarray:
        if isinstance(self.tokenizer, CharTokenizer):
            return self.tokenizer.encode_array(text)
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def weak(self, seed: int) -> np.ndarray:
        """Weak 0/1 labels per training passage for `seed` (same in every arm)."""
        t = self.text
        return weak_set(self.reference[self.parts["train"]], t.coverage, t.false_positives, seed)

    def span_masks(self) -> list[np.ndarray] | None:
        """Per training passage, which tokens the labeller's spans cover (None unless weak_labels = 'spans')."""
        if self.text.weak_labels != "spans":
            return None
        if self._spans is None:
            texts = [self.texts[i] + SEPARATOR for i in self.parts["train"]]
            self._spans = [token_mask(t, self.tokenizer.spans(t), self.text.concept, self.text.span_after) for t in texts]
        return self._spans

    def keep(self, arm: str, seed: int) -> np.ndarray:
        """Which training passages an arm trains on (bool per training passage)."""
        n = len(self.parts["train"])
        if arm == "weak-filtered":
            return self.weak(seed) == 0
        if arm == "oracle-filtered":
            return self.reference[self.parts["train"]] == 0
        return np.ones(n, dtype=bool)


def token_mask(text: str, token_spans: list[tuple[int, int]], concept: str, after: int) -> np.ndarray:
    """Bool per token (given by its character span in `text`): does it overlap a word where the
    labeller fired, or one of the `after` characters past it. The rule of a training span label and
    of an evaluation concept position alike."""
    covered = np.zeros(len(text), dtype=bool)
    for s, e in concept_spans(text, concept):
        covered[s:min(len(text), e + after)] = True
    prefix = np.concatenate([[0], np.cumsum(covered)])
    spans = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
    empty = spans[:, 1] <= spans[:, 0]  # a zero-width byte token reads the characters around it
    start = np.clip(np.where(empty, spans[:, 0] - 1, spans[:, 0]), 0, len(text))
    end = np.clip(np.where(empty, spans[:, 0] + 1, spans[:, 1]), 0, len(text))
    return prefix[end] - prefix[start] > 0


def _build(text: TextConfig) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    corpus = load_corpus(text.corpus)
    parts = split_indices(corpus.ids(), text.split, text.split_seed)
    if len(parts["train"]) == 0:
        raise AnchoringError(f"corpus {text.corpus!r} leaves no training passages after the split")
    if len(parts["validation"]) == 0:
        raise AnchoringError(f"corpus {text.corpus!r} leaves no validation passages; use more text or a larger split")
    ref = reference_labels(Passages.of(corpus), text.concept).astype(np.int8)
    return list(corpus.texts), parts, ref


@functools.lru_cache(maxsize=4)
def _cached(text_json: str) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    return _build(TextConfig.model_validate_json(text_json))


def load_data(text: TextConfig, run_dir: Path | None = None) -> LMData:
    """Corpus, split and labels (cached per process), and the tokenizer: read from `run_dir` when the
    run saved one (resume and `load_run` use the same vocabulary / merges), else trained on the
    training passages and saved there."""
    texts, parts, ref = _cached(text.model_dump_json())
    tok_path = run_dir / TOKENIZER if run_dir is not None else None
    if run_dir is not None:  # before the tokenizer is read or trained, also where it was lost
        check_corpus(run_dir, _fingerprint(text.model_dump_json()))
    if tok_path is not None and tok_path.is_file():
        from anchoring.domains.text.tokenize import load_tokenizer

        tok = load_tokenizer(tok_path)
        if tok.kind != text.tokenizer:
            raise AnchoringError(f"{tok_path} holds a {tok.kind} tokenizer but the config asks for {text.tokenizer}")
    else:
        tok = _tokenizer(text.model_dump_json())
        if tok_path is not None:
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / CORPUS, json.dumps(_fingerprint(text.model_dump_json())) + "\n")  # before the tokenizer
            tok.save(tok_path)
    data = LMData(text, texts, parts, ref, tok)
    # keyed by the tokenizer's content: a saved tokenizer that differs from a freshly trained one of the same
    # kind and size (another `tokenizers` version, a tie broken otherwise) must not reuse the other's encodings
    data.train_tokens = _encode_train(data, json.dumps([text.model_dump_json(), hashlib.sha256(tok.dumps().encode()).hexdigest()]))
    return data


@functools.lru_cache(maxsize=4)
def _fingerprint(text_json: str) -> dict[str, object]:
    """What the run's numbers rest on besides its config: every passage, its split and its reference
    label. A corpus folder edited, or a labeller's package upgraded, between two sessions of one run
    changes it."""
    texts, parts, ref = _cached(text_json)
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    for name in sorted(parts):
        h.update(name.encode() + np.asarray(parts[name], dtype=np.int64).tobytes())
    h.update(np.asarray(ref, dtype=np.int8).tobytes())
    return {"sha256": h.hexdigest(), "passages": len(texts)}


def check_corpus(run_dir: Path, now: dict[str, object]) -> None:
    """Refuse to go on with a run whose corpus, split or labels changed since it started (runs from
    before the fingerprint have none, and are not checked)."""
    path = run_dir / CORPUS
    if not path.is_file():
        return
    try:
        then = json.loads(path.read_text(encoding="utf-8"))
        digest, count = then["sha256"], then["passages"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnchoringError(f"cannot read {path}: {e}") from None
    if digest != now["sha256"]:
        raise AnchoringError(f"{str(run_dir)!r} trained on another corpus, split or labels ({count:,} passages then, "
                             f"{now['passages']:,} now): restore the corpus it was trained on (or the labelling "
                             f"packages' versions), or start a new run")


@functools.lru_cache(maxsize=4)
def _tokenizer(text_json: str) -> CharTokenizer | BPETokenizer:
    text = TextConfig.model_validate_json(text_json)
    texts, parts, _ = _cached(text_json)
    return train_tokenizer(text.tokenizer, [texts[i] + SEPARATOR for i in parts["train"]], text.bpe_vocab)


_ENCODED: dict[str, list[np.ndarray]] = {}


def _encode_train(data: LMData, key: str) -> list[np.ndarray]:
    if key not in _ENCODED:
        _ENCODED.clear()
        _ENCODED[key] = [data.encode(data.texts[i] + SEPARATOR) for i in data.parts["train"]]
    return _ENCODED[key]


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next tokens
    passage: torch.Tensor  # (B, T) training-passage index of each input token
    line: torch.Tensor  # (B, T) passage number within its window (0, 1, …): the "line" of pool_lines
    line_labels: torch.Tensor  # (B, K) weak label of each window passage
    labels: torch.Tensor  # (B, T) weak label of each input position (its passage's, or its span's)
    # (B, T) weak label of each position's target token: what a loss-side method (SGTM, gradient routing) steers
    # by, since the loss at position t is the prediction of token t+1 (the first letter of a labelled word is
    # predicted at the position before it)
    target_labels: torch.Tensor


class Stream:
    """The token stream of one (seed, arm): see the module docstring. Pure function of (seed, step)."""

    def __init__(self, tokens: list[np.ndarray], keep: np.ndarray, seed: int, window: int,
                 spans: list[np.ndarray] | None = None) -> None:
        self.tokens, self.keep, self.seed, self.window, self.spans = tokens, keep, seed, window, spans
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        self.length = int(lengths[keep].sum())
        if self.length < window + 1:
            raise AnchoringError(f"the training text of this arm has {self.length} tokens, fewer than one window "
                                 f"of {window + 1}")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Training passages of `epoch` in stream order (the shared permutation, removed ones skipped)."""
        perm = np.random.default_rng([self.seed, epoch, BATCH_SALT]).permutation(len(self.tokens))
        return perm[self.keep[perm]]

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if e not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            order = self.order(e)
            toks = np.concatenate([self.tokens[i] for i in order])
            pid = np.repeat(order, [len(self.tokens[i]) for i in order])
            mask = np.concatenate([self.spans[i] for i in order]) if self.spans is not None else None
            self._epochs[e] = (toks, pid, mask)
        return self._epochs[e]

    def span(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """`n` tokens, their passage ids, span flags (None without spans) and epochs from global stream
        offset `start`, across epochs. The epochs tell two readings of one passage apart where it ends
        one epoch and starts the next."""
        toks, pids, masks, epochs = [], [], [], []
        while n > 0:
            e, off = divmod(start, self.length)
            t, p, m = self.epoch(e)
            take = min(n, self.length - off)
            toks.append(t[off:off + take])
            pids.append(p[off:off + take])
            epochs.append(np.full(take, e, dtype=np.int64))
            if m is not None:
                masks.append(m[off:off + take])
            start, n = start + take, n - take
        return (np.concatenate(toks), np.concatenate(pids), (np.concatenate(masks) if masks else None),
                np.concatenate(epochs))

    def batch(self, step: int, size: int, labels: np.ndarray, rows: range | None = None) -> Batch:
        """Windows step·size … step·size+size−1 (or only `rows` of them, for a data-parallel rank)."""
        T = self.window
        rows = rows if rows is not None else range(size)
        xs, ps, ms, es = [], [], [], []
        for r in rows:
            t, p, m, e = self.span((step * size + r) * T, T + 1)
            xs.append(t)
            ps.append(p)
            es.append(e[:-1])
            if m is not None:
                ms.append(m)
        x = torch.from_numpy(np.stack(xs).astype(np.int64))
        every = labels[np.stack(ps)].astype(np.float32)  # (B, T+1): one label per token of the window
        if ms:
            every = every * np.stack(ms)
        passage = torch.from_numpy(np.stack(ps)[:, :-1].astype(np.int64))
        per_position, per_target = every[:, :-1], every[:, 1:]
        change = torch.ones_like(passage, dtype=torch.bool)
        epoch = torch.from_numpy(np.stack(es))
        change[:, 1:] = (passage[:, 1:] != passage[:, :-1]) | (epoch[:, 1:] != epoch[:, :-1])  # a new passage, or the same one read again
        line = change.long().cumsum(1) - 1
        K = int(line.max()) + 1
        first = torch.zeros(len(rows), K, dtype=torch.long)
        first.scatter_(1, line, passage)  # every position of a line holds the same passage id
        lab = torch.from_numpy(labels.astype(np.float32))[first]
        valid = torch.zeros(len(rows), K, dtype=torch.bool)
        valid.scatter_(1, line, True)
        return Batch(x[:, :-1], x[:, 1:], passage, line, lab * valid, torch.from_numpy(np.ascontiguousarray(per_position)),
                     torch.from_numpy(np.ascontiguousarray(per_target)))
