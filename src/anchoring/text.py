"""Public text API: weak concept probabilities and the character spans behind them.

    >>> from anchoring.text import weak_labels, concept_spans
    >>> weak_labels(["He stabs him with his dagger.", "A fair morning."], "violence")  # doctest: +SKIP
    array([0.84, 0.29])
    >>> concept_spans("He stabs him with his dagger.", "violence")
    [(3, 8), (22, 28)]
"""

from __future__ import annotations

import numpy as np

from anchoring.domains.text.labelling import Passages
from anchoring.domains.text.labelling import concept_spans as _concept_spans
from anchoring.domains.text.weak import probabilities
from anchoring.errors import AnchoringError

__all__ = ["weak_labels", "concept_spans"]


def weak_labels(texts: list[str], concept: str) -> np.ndarray:
    """Calibrated probability per text that it carries `concept` (violence, deception, milton).

    Plain texts carry no metadata (genre, speaker), so the metadata labelling function stays silent;
    stage directions are found by their brackets.
    """
    if isinstance(texts, str):  # list("abc") would label each character
        raise AnchoringError("weak_labels takes a list of texts; wrap a single text as [text]")
    return probabilities(Passages(list(texts)), concept)


def concept_spans(text: str, concept: str) -> list[tuple[int, int]]:
    """Merged (start, end) character spans where a word-level labelling function fired."""
    return _concept_spans(text, concept)
