"""Train / validation / test split by passage, identical in every process.

Each passage id (`work:line`) is hashed with BLAKE2b keyed by the seed; the hash, read as a number
in [0, 1), picks the part. Python's `hash()` is salted per process, so it is never used; and unlike a
permutation of the whole list, adding one work does not reshuffle every other passage.
"""

from __future__ import annotations

import hashlib

import numpy as np

from anchoring.errors import AnchoringError

PARTS = ("train", "validation", "test")


def unit_hash(ids: list[str], seed: int) -> np.ndarray:
    """A stable uniform number in [0, 1) per id, from BLAKE2b(seed, id)."""
    key = seed.to_bytes(8, "little", signed=False)
    out = np.empty(len(ids), dtype=np.float64)
    for i, s in enumerate(ids):
        out[i] = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8, key=key).digest(), "little") / 2.0**64
    return out


def split_passages(ids: list[str], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0) -> np.ndarray:
    """Part index per passage (0 train, 1 validation, 2 test)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise AnchoringError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if seed < 0:
        raise AnchoringError(f"split_seed must be ≥ 0, got {seed}")
    if len(set(ids)) != len(ids):
        raise AnchoringError("passage ids are not unique; cannot split stably")
    u = unit_hash(ids, seed)
    edges = np.cumsum(fractions)[:2]
    return np.searchsorted(edges, u, side="right").astype(np.int8)


def split_indices(ids: list[str], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0) -> dict[str, np.ndarray]:
    """{'train': indices, 'validation': …, 'test': …} in corpus order."""
    part = split_passages(ids, fractions, seed)
    return {name: np.flatnonzero(part == k) for k, name in enumerate(PARTS)}
