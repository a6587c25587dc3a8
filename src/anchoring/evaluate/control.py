"""Numbers any kind's edits are judged by: selectivity (R² of damage vs similarity) and Pareto fronts."""

from __future__ import annotations

import numpy as np
import torch


def selectivity(errors: torch.Tensor, similarity: torch.Tensor, k: float) -> torch.Tensor:
    """R² of a linear fit of error on similarity^k, per seed: 1 = the damage is exactly as predicted.

    Signed: an edit whose damage *falls* as similarity rises (it spares the concept and breaks the
    rest) fits a line just as well, so its R² is given a minus sign rather than read as selective.
    `errors` `(seeds, N)`, `similarity` `(N,)`. A seed whose errors do not vary scores 0.
    """
    x = similarity.double().pow(k)
    x = x - x.mean()
    e = errors.double() - errors.double().mean(-1, keepdim=True)
    cov = (e * x).sum(-1)
    denom = (e.pow(2).sum(-1) * x.pow(2).sum()).clamp_min(1e-30)
    return (cov.sign() * cov.pow(2) / denom).float()


def pareto_front(objectives: np.ndarray) -> list[int]:
    """Indices of rows not dominated by any other (every column: lower is better)."""
    front = []
    for i, row in enumerate(objectives):
        dominated = any(np.all(other <= row) and np.any(other < row) for j, other in enumerate(objectives) if j != i)
        if not dominated:
            front.append(i)
    return front
