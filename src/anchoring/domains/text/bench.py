"""Timing of the text data path (load, split, char-tokenize, label) for the bench table."""

from __future__ import annotations

import time

from anchoring.domains.text.corpus import load_corpus
from anchoring.domains.text.labelling import Passages
from anchoring.domains.text.split import split_indices
from anchoring.domains.text.tokenize import CharTokenizer
from anchoring.domains.text.weak import reference_labels


def text_pipeline_timing(corpus: str = "shakespeare", concept: str = "violence", cache: bool = True) -> dict[str, float]:
    """Seconds per stage on the whole corpus. `cache=False` re-parses the corpus (VADER scores stay cached)."""
    t = {}
    t0 = time.perf_counter()
    c = load_corpus(corpus, cache=cache)
    t["load_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    parts = split_indices(c.ids())
    t["split_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    tok = CharTokenizer.train(c.texts[i] for i in parts["train"])
    ids = [tok.encode_array(x) for x in c.texts]
    t["tokenize_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    reference_labels(Passages.of(c), concept)
    t["label_s"] = time.perf_counter() - t1
    t["total_s"] = time.perf_counter() - t0
    t["passages"] = float(len(c))
    t["tokens"] = float(sum(len(x) for x in ids))
    return t
