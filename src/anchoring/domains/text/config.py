"""`[text]` settings of a language-model experiment, validated at the boundary.

The LM experiment kind embeds this model as its `text` table, so `--set text.corpus=PATH` works.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from anchoring.config import _Strict
from anchoring.domains.text.corpus import BUILTIN


class TextConfig(_Strict):
    corpus: str = Field("shakespeare", description="shakespeare | milton | mixed | a folder of .txt files")
    tokenizer: Literal["char", "bpe"] = "char"
    bpe_vocab: int = Field(1024, ge=260, le=65536, description="byte-level BPE vocabulary size (≥ 256 bytes + a few merges)")
    split: tuple[float, float, float] = Field((0.9, 0.05, 0.05), description="train / validation / test fractions of passages")
    split_seed: int = Field(0, ge=0, lt=2**64)  # the split hashes it as 8 bytes
    concept: str = "violence"
    coverage: float = Field(0.3, ge=0.0, le=1.0, description="fraction of reference positives that carry a weak label")
    false_positives: float = Field(0.0, ge=0.0, le=1.0, description="fraction of reference negatives labelled positive")
    weak_labels: Literal["passages", "spans"] = Field(
        "passages", description="what a weak label marks: the whole passage, or only the labeller's words in it plus "
                                "`span_after` characters (positions inside spans are labelled, the rest unlabelled)")
    span_after: int = Field(20, ge=0, le=200, description="characters after a labelled word that weak_labels = 'spans' "
                                                          "also marks")

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(x) and x >= 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:  # NaN compares false
            raise ValueError(f"split fractions must be ≥ 0, sum to 1 and give training data, got {v}")
        return v

    @field_validator("corpus")
    @classmethod
    def _corpus(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("corpus must be shakespeare, milton, mixed or a folder path")
        if v in BUILTIN:
            return v
        # a folder is kept as an absolute path, so that the run opens (resume, edits, load_run) from any directory
        return str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _concept(self) -> "TextConfig":
        from anchoring.domains.text.lexicons import CONCEPTS

        if self.concept not in CONCEPTS:
            raise ValueError(f"unknown concept {self.concept!r}; known: {', '.join(CONCEPTS)}")
        return self
