"""Dense grids of colours to sample from and evaluate on."""

from __future__ import annotations

import torch

from anchoring.domains.colour.spaces import hsv_to_rgb


def rgb_grid(n: int) -> torch.Tensor:
    """`(n**3, 3)` RGB points on an n-level lattice of the unit cube, corners included."""
    if n < 2:
        raise ValueError(f"rgb grid needs at least 2 levels per channel, got {n}")
    levels = torch.linspace(0.0, 1.0, n)
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    return torch.stack([r, g, b], dim=-1).reshape(-1, 3)


def hsv_grid(hues: int, sats: int, vals: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV lattice `(hues*sats*vals, 3)` in RGB, with the HSV coordinates alongside.

    Hue takes `hues` values per turn (no duplicate at 360°); s and v include both ends.
    Returns `(rgb, hsv)`.
    """
    if hues < 1 or sats < 1 or vals < 1:
        raise ValueError(f"hsv grid sizes must be positive, got {hues}x{sats}x{vals}")
    h = torch.arange(hues, dtype=torch.float32) / hues
    s = torch.linspace(0.0, 1.0, sats) if sats > 1 else torch.ones(1)
    v = torch.linspace(0.0, 1.0, vals) if vals > 1 else torch.ones(1)
    hh, ss, vv = torch.meshgrid(h, s, v, indexing="ij")
    hsv = torch.stack([hh, ss, vv], dim=-1).reshape(-1, 3)
    return hsv_to_rgb(hsv), hsv


def hsv_weights(hsv: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Sampling weights that undo an HSV grid's over-representation of black and white.

    Every hue at v=0 is the same black (and at s=0 the same grey), so a uniform draw over an
    HSV grid oversamples them; weighting by (s*v)-ish chroma volume evens it out.
    Weights are `(s * v) ** power` floored at a small value so nothing becomes unreachable.
    """
    s, v = hsv[..., 1], hsv[..., 2]
    return (s * v).pow(power).clamp_min(1e-3)
