"""Post-hoc concept directions for models that were not anchored: the baselines anchoring is
compared with. Both are fitted on activations captured at a site, then applied through the same
hooks (`control.intervene`) and weight edits as an anchor direction."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def mean_difference(acts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit direction from the mean of unlabelled to the mean of labelled activations `(N, D)`."""
    lab = labels.bool()
    if lab.all() or not lab.any():
        raise ValueError("a difference of means needs both labelled and unlabelled activations")
    return F.normalize(acts[lab].mean(0) - acts[~lab].mean(0), dim=-1)


def leace(acts: torch.Tensor, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """LEACE (Belrose et al. 2023) through the maintained `concept-erasure` package: the least-squares
    edit after which no linear probe beats a constant at predicting `labels` from the activations."""
    from concept_erasure import LeaceFitter

    # svd_tol: the package drops singular values of the whitened cross-covariance below 0.01 by default.
    # For one binary label that value is √(p(1−p)) × the whitened class-mean gap, so a rare label (1% of
    # positions, as span labels are) with a modest gap falls under it and the eraser silently becomes
    # the identity. Keep it positive, as the package requires, but far below any real signal.
    fitter = LeaceFitter(acts.shape[-1], 1, dtype=torch.float64, svd_tol=1e-9)
    fitter.update(acts.double(), labels.double().reshape(-1, 1))
    eraser = fitter.eraser

    def erase(x: torch.Tensor) -> torch.Tensor:
        return eraser(x.double()).to(x.dtype)

    return erase
