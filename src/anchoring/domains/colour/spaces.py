"""Vectorised RGB <-> HSV in torch; every value in [0, 1] (hue as a fraction of a turn)."""

from __future__ import annotations

import torch


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Convert `(..., 3)` RGB to `(..., 3)` HSV; hue in [0, 1), 0 = red. Greys get hue 0."""
    r, g, b = rgb.unbind(-1)
    maxc, argmax = rgb.max(dim=-1)
    minc = rgb.min(dim=-1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # Sector-wise hue in units of 60 degrees; which formula applies depends on the max channel.
    h_r = ((g - b) / safe) % 6.0
    h_g = (b - r) / safe + 2.0
    h_b = (r - g) / safe + 4.0
    h = torch.where(argmax == 0, h_r, torch.where(argmax == 1, h_g, h_b))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=-1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Convert `(..., 3)` HSV (hue in turns, wrapped) to RGB."""
    h, s, v = hsv.unbind(-1)
    h6 = (h % 1.0) * 6.0
    # Closed form: each channel is v - v*s*clamp(min(k, 4-k), 0, 1) with a channel-specific phase.
    def channel(n: float) -> torch.Tensor:
        k = (n + h6) % 6.0
        return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)

    return torch.stack([channel(5.0), channel(3.0), channel(1.0)], dim=-1)
