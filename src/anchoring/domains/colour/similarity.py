"""Perceptual-ish similarity in HSV, used to predict which colours an edit should hurt."""

from __future__ import annotations

import torch

from anchoring.domains.colour.spaces import rgb_to_hsv


def hsv_similarity(rgb_a: torch.Tensor, rgb_b: torch.Tensor) -> torch.Tensor:
    """Similarity in [0, 1] between colours (broadcasting `(..., 3)` RGB tensors).

    `[r·max(0, 1 − Δh/90°) + (1 − r)] · (1 − |Δs|) · (1 − |Δv|)`, with r the mean of the two
    colours' s·v: hue only matters in proportion to how chromatic the pair is.
    """
    a, b = rgb_to_hsv(rgb_a), rgb_to_hsv(rgb_b)
    dh = (a[..., 0] - b[..., 0]).abs()
    dh_deg = torch.minimum(dh, 1.0 - dh) * 360.0
    r = 0.5 * (a[..., 1] * a[..., 2] + b[..., 1] * b[..., 2])
    hue_term = r * (1.0 - dh_deg / 90.0).clamp_min(0.0) + (1.0 - r)
    return hue_term * (1.0 - (a[..., 1] - b[..., 1]).abs()) * (1.0 - (a[..., 2] - b[..., 2]).abs())
