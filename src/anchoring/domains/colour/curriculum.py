"""Data curricula for colour: how far into the colour space each point lies.

Depth 0: the six primaries and secondaries; 0.25: every other bright saturated hue; 0.5:
saturated hues at every value; 0.75: bright hues at every saturation; 1: everything else
(the greys and muted colours). A curriculum is a schedule column `extent` in [0, 1]:
points with depth ≤ extent are sampled at full weight and the next band fades in, so a
stepped curriculum is just `extent:linear:step` and a smooth one `extent` (min-jerk).
"""

from __future__ import annotations

import torch

from anchoring.domains.colour.spaces import rgb_to_hsv

BAND = 0.25  # width of the fade-in band; also the gap between depths


def curriculum_depth(rgb: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    h, s, v = rgb_to_hsv(rgb).unbind(-1)
    full_s, full_v = s >= 1 - tol, v >= 1 - tol
    six = ((h * 6) - (h * 6).round()).abs() < tol * 6
    depth = torch.ones_like(h)
    depth = torch.where(full_v, torch.full_like(h, 0.75), depth)
    depth = torch.where(full_s, torch.full_like(h, 0.5), depth)
    depth = torch.where(full_s & full_v, torch.full_like(h, 0.25), depth)
    return torch.where(full_s & full_v & six, torch.zeros_like(h), depth)


def curriculum_weights(depth: torch.Tensor, extent: float) -> torch.Tensor:
    """Per-point multiplier: 1 up to `extent`, fading to 0 over the next band."""
    return (1.0 + (extent - depth) / BAND).clamp(0.0, 1.0)
