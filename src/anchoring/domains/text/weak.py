"""Combine labelling functions into one probability, calibrate it, and derive the three label sets.

Combination is a fixed logistic model, z = bias + Σ w·f(score), with hand-set weights rather than a
learned label model: with four functions and one of them (metadata) almost always on, a generative
Snorkel model has little to work with, and fixed weights keep the labels identical across runs and
machines. Calibration then shifts the bias so that, on the reference corpus, the share of passages
with p ≥ 0.5 equals the concept's target rate (estimated from the hand-labelled gold set for
violence), which makes "positive" mean the same thing whatever the weights' overall scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from anchoring.domains.text.labelling import Passages, functions, score_matrix
from anchoring.errors import AnchoringError


@dataclass(frozen=True)
class Combiner:
    """z = bias + Σ weight_k · transform(score_k); p = sigmoid(z − shift). Reference label: p ≥ 0.5."""

    weights: tuple[float, ...]
    bias: float
    shift: float  # calibration: set by `calibrate` on the reference corpus, stored here so labels need no corpus
    target_rate: float  # reference positive rate the shift was calibrated to

    def logits(self, scores: np.ndarray) -> np.ndarray:
        feats = np.log1p(np.clip(scores, 0.0, None))  # diminishing returns: the tenth "blood" adds little
        return self.bias + feats @ np.asarray(self.weights) - self.shift

    def probability(self, scores: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(scores)))


# Weights are per labelling function, in the order of `labelling.functions(concept)`.
# Shifts were set with `calibrate` on the full Shakespeare corpus (violence, deception) or the
# mixed corpus (milton); tests/test_text_labels.py checks they still give the target rate.
COMBINERS: dict[str, Combiner] = {
    # lexicon, stage directions, VADER negative, metadata (genre + role)
    "violence": Combiner((1.6, 2.5, 1.0, 0.3), bias=-3.0, shift=-2.1100, target_rate=0.13),
    # lexicon, VADER negative. Target rate is a judgement (no gold set): deceit is rarer than violence.
    "deception": Combiner((2.0, 0.8), bias=-3.0, shift=-2.5253, target_rate=0.08),
    # lexicon only; target = Milton's share of the mixed corpus (4.55%); ties leave it at 2.7% (one strong
    # Miltonic word is needed). The reference labels for milton on the mixed corpus are the exact domains.
    "milton": Combiner((2.0,), bias=-3.0, shift=-2.1891, target_rate=0.0455),
}


def calibrate(logits: np.ndarray, rate: float) -> float:
    """Shift s such that mean(logits − s ≥ 0) ≈ rate (the (1−rate) quantile of the logits)."""
    if not 0.0 < rate < 1.0:
        raise AnchoringError(f"target rate must be in (0, 1), got {rate}")
    t = float(np.quantile(logits, 1.0 - rate))
    if np.mean(logits >= t) > rate + 0.01:  # ties at the quantile (many passages with no hits): step above them
        above = logits[logits > t]
        t = float(above.min()) if len(above) else t
    return t


def combiner(concept: str) -> Combiner:
    functions(concept)  # raises the one-line error for an unknown concept
    return COMBINERS[concept]


def probabilities(p: Passages, concept: str) -> np.ndarray:
    """Calibrated probability per passage that it carries `concept`."""
    _, scores = score_matrix(p, concept)
    return combiner(concept).probability(scores)


KNOWN_SOURCES = ("shakespeare", "milton")  # corpus domains whose author is known


def reference_labels(p: Passages, concept: str) -> np.ndarray:
    """The best labeller's 0/1 labels (ground truth for evaluation). For `milton`, exact where every
    passage's source is a built-in corpus; a user's folder (domain "user") may hold Milton, so the
    labeller decides there."""
    if concept == "milton" and p.domain and all(d in KNOWN_SOURCES for d in p.domain):
        return exact_domain_labels(p.domain, "milton")
    return (probabilities(p, concept) >= 0.5).astype(np.int8)


def exact_domain_labels(domain: list[str], name: str = "milton") -> np.ndarray:
    return np.array([d == name for d in domain], dtype=np.int8)


def _check_rates(coverage: float, false_positives: float) -> None:
    for flag, v in (("coverage", coverage), ("false_positives", false_positives)):
        if isinstance(v, bool) or not (isinstance(v, (int, float, np.integer, np.floating)) and 0.0 <= v <= 1.0):
            raise AnchoringError(f"{flag} must be between 0 and 1, got {v}")


def weak_set(reference: np.ndarray, coverage: float, false_positives: float, seed: int) -> np.ndarray:
    """Fixed sparse, noisy training labels: exactly round(c·n_pos) reference positives and
    round(f·n_neg) reference negatives carry a 1, chosen by a seeded permutation; all else 0 (unlabelled).

    Exact counts (not Bernoulli draws) keep the realised rates within one passage of the requested
    ones, so an arm's coverage is what the config says; same seed → same set in every process.
    """
    _check_rates(coverage, false_positives)
    ref = np.asarray(reference).astype(bool)
    rng = np.random.default_rng([seed, 0x5EED])
    pos, neg = np.flatnonzero(ref), np.flatnonzero(~ref)
    out = np.zeros(len(ref), dtype=np.int8)
    out[rng.permutation(pos)[: int(round(coverage * len(pos)))]] = 1
    out[rng.permutation(neg)[: int(round(false_positives * len(neg)))]] = 1
    return out


def label_probability(reference: np.ndarray, coverage: float, false_positives: float) -> np.ndarray:
    """Per-passage chance of a positive label in a batch: c for reference positives, f for negatives."""
    _check_rates(coverage, false_positives)
    ref = np.asarray(reference).astype(bool)
    return np.where(ref, coverage, false_positives)


def _salt(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def draw(probability: np.ndarray, seed: int, step: int, salt: str = "labels") -> np.ndarray:
    """Bernoulli labels for one batch, keyed by (seed, step, salt) only: every arm of an experiment that
    shares the seed sees identical draws at a step, whatever it did before."""
    if seed < 0 or step < 0:
        raise AnchoringError(f"seed and step must be ≥ 0, got {seed}, {step}")
    rng = np.random.default_rng([seed, step, _salt(salt)])
    return (rng.random(len(probability)) < probability).astype(np.int8)
