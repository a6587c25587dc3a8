"""Labelling functions: each maps a passage to a non-negative score (0 = silent) and, where it can,
to the character spans that made it fire.

Four kinds, deliberately different in what they see, so their agreements and conflicts say
something: a word lexicon, stage-direction patterns, VADER negative sentiment, and metadata
(genre of the work, the speaker's role).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from anchoring.atomic import write_atomic
from anchoring.domains.text.corpus import Corpus, cache_dir, stage_spans
from anchoring.domains.text.lexicons import CONCEPTS, lexicon_hits
from anchoring.errors import AnchoringError


@dataclass
class Passages:
    """What the labelling functions look at: texts plus whatever metadata is known ('' when not)."""

    texts: list[str]
    genre: list[str] = field(default_factory=list)
    speaker: list[str] = field(default_factory=list)
    stage: list[list[tuple[int, int]]] = field(default_factory=list)
    domain: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.texts)
        self.genre = self.genre or [""] * n
        self.speaker = self.speaker or [""] * n
        self.stage = self.stage or [stage_spans(t) for t in self.texts]
        self.domain = self.domain or [""] * n

    @classmethod
    def of(cls, corpus: Corpus) -> "Passages":
        return cls(list(corpus.texts), [corpus.genre(i) for i in range(len(corpus))], list(corpus.speaker),
                   list(corpus.stage), list(corpus.domain))


# Stage directions that show violence on stage. Only matched inside `[...]` spans, where verbs are
# the play's actions, not a character's words ("Dies" in a direction is a death; in verse it may not be).
_STAGE_VIOLENCE = re.compile(
    r"(?<!\w)(?:dies|die|dying|kills?|killed|slays?|slain|stabs?|stabbing|fights?|fighting|fight\.|wounds?|wounded|"
    r"bleeding|strikes?|struck|beats?|throttles?|strangles?|smothers?|poisons?|poisoned|duel|combat|"
    r"alarums?|excursions|battle|retreat|execution|beheaded|head of|body of|bodies|dead|falls(?= dead)|"
    r"draw(?:s)?(?= their swords| his sword| swords)|with drawn swords|swords drawn|wrestle|wrestles)(?!\w)", re.I)
# The odd unbracketed direction at a line start ("Dies.", "Kills him.", "They fight.").
_STAGE_LINE = re.compile(r"^\s*(?:Dies|Kills (?:him|her)|Stabs (?:him|her)|They fight|Fight|Fights)\b.*$", re.M)


def stage_violence(text: str, stage: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of violent action words inside stage directions, plus unbracketed `Dies.`-style lines."""
    out = []
    for s, e in stage:
        for m in _STAGE_VIOLENCE.finditer(text, s, e):
            out.append((m.start(), m.end()))
    out += [(m.start(), m.end()) for m in _STAGE_LINE.finditer(text) if not any(s <= m.start() < e for s, e in stage)]
    return sorted(out)


VIOLENT_ROLES = re.compile(r"murderer|soldier|executioner|captain|sergeant|keeper|gaoler|warder|outlaw|rebel", re.I)


@dataclass(frozen=True)
class LabellingFunction:
    """name, what it scores, and (if it can point at words) the spans it fired on."""

    name: str
    score: Callable[[Passages], np.ndarray]
    spans: Callable[[str, list[tuple[int, int]]], list[tuple[int, int]]] | None = None


def lexicon_lf(concept: str) -> LabellingFunction:
    def score(p: Passages) -> np.ndarray:
        return np.array([sum(w for _, _, w in lexicon_hits(t, concept)) for t in p.texts], dtype=np.float64)

    return LabellingFunction(f"lexicon:{concept}", score, lambda t, st: [(s, e) for s, e, _ in lexicon_hits(t, concept)])


def stage_lf() -> LabellingFunction:
    def score(p: Passages) -> np.ndarray:
        return np.array([len(stage_violence(t, st)) for t, st in zip(p.texts, p.stage)], dtype=np.float64)

    return LabellingFunction("stage:violence", score, stage_violence)


VADER_VERSION = "vader-1"


def vader_scores(texts: list[str]) -> np.ndarray:
    """VADER compound score per text, cached on disk by a hash of all texts (≈2 s for the plays, so worth it)."""
    h = hashlib.sha256(VADER_VERSION.encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    file = cache_dir() / f"vader-{h.hexdigest()[:20]}.npy"
    if file.is_file():
        try:
            arr = np.load(file)
            if arr.shape == (len(texts),):
                return arr
        except (OSError, ValueError):
            pass
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    arr = np.array([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)
    if len(texts) >= 1000:  # small calls (tests, the API on a few sentences) are not worth a file
        buf = io.BytesIO()
        np.save(buf, arr)
        try:
            write_atomic(file, buf.getvalue())
        except OSError:
            pass
    return arr


def vader_lf() -> LabellingFunction:
    """Negative sentiment (−compound, clipped at 0): violence and deceit speeches are rarely cheerful."""
    return LabellingFunction("vader:negative", lambda p: np.clip(-vader_scores(p.texts), 0.0, 1.0))


def metadata_lf() -> LabellingFunction:
    """Prior from provenance: tragedies and histories, and speakers such as murderers and soldiers."""

    def score(p: Passages) -> np.ndarray:
        g = np.array([1.0 if x in ("tragedy", "history") else 0.0 for x in p.genre])
        r = np.array([1.0 if VIOLENT_ROLES.search(s or "") else 0.0 for s in p.speaker])
        return g + r

    return LabellingFunction("metadata:genre+role", score)


def functions(concept: str) -> list[LabellingFunction]:
    """The labelling functions used for `concept`."""
    if concept not in CONCEPTS:
        raise AnchoringError(f"unknown concept {concept!r}; known: {', '.join(CONCEPTS)}")
    if concept == "violence":
        return [lexicon_lf("violence"), stage_lf(), vader_lf(), metadata_lf()]
    if concept == "deception":
        return [lexicon_lf("deception"), vader_lf()]
    return [lexicon_lf("milton")]


def concept_spans(text: str, concept: str) -> list[tuple[int, int]]:
    """Merged character spans where any span-giving labelling function fired."""
    stage = stage_spans(text)
    spans = sorted(s for lf in functions(concept) if lf.spans for s in lf.spans(text, stage))
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def score_matrix(p: Passages, concept: str) -> tuple[list[str], np.ndarray]:
    """(names, scores[n_passages, n_functions])."""
    lfs = functions(concept)
    return [lf.name for lf in lfs], np.stack([lf.score(p) for lf in lfs], axis=1)
