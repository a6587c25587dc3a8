"""An orthonormal basis of a set of directions, with the dependent ones dropped.

`torch.linalg.qr` returns as many columns as it is given, so two equal directions would give a
second, arbitrary basis vector, and an edit or a gradient route built on it would act along a
direction nobody chose."""

from __future__ import annotations

from typing import Sequence

import torch


def orthonormal(directions: Sequence[torch.Tensor], tol: float = 1e-6) -> list[torch.Tensor]:
    """An orthonormal basis of the span of `directions` (Gram–Schmidt in order; dependent ones dropped)."""
    basis: list[torch.Tensor] = []
    for v in directions:
        w = v.double().flatten()
        for b in basis:
            w = w - (w @ b) * b
        if w.norm() > tol * max(float(v.double().norm()), 1.0):
            basis.append(w / w.norm())
    return [b.float() for b in basis]
