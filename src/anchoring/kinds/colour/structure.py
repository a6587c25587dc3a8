"""A structure score for colour latents: did the hue wheel form, with the anchor where we put it?

Four numbers per seed, each readable on its own:
- `hue_order`: fraction of the 12 steps between neighbouring named hues that turn the same
  way around the hue plane (1.0: all in order; ~0.5: no order), and 0 when the hues do not
  go round the plane exactly once (a scrambled wheel can turn consistently but wind 5 times).
- `anchor_angle_deg`: angle between the concept's pure colour and its anchor (0 is perfect).
- `vibrant_in_plane`: share of saturated colours' squared norm that lies in the hue plane
  (1.0: the wheel is flat in those dims).
- `spread_deg`: mean angle from each colour of the 8³ grid to its nearest neighbour; near
  0 means colours collapse onto each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anchoring.domains.colour import hsv_to_rgb, rgb_grid
from anchoring.kinds.colour.metrics import hue_latents, hue_winding


def hue_order_agreement(z_hues: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """`(..., 12, E)` → `(...)`: majority share of same-direction hue steps, 0 unless winding is ±1."""

    angle = torch.atan2(z_hues[..., dims[1]], z_hues[..., dims[0]])
    step = torch.diff(torch.cat([angle, angle[..., :1]], dim=-1), dim=-1)
    step = (step + math.pi) % (2 * math.pi) - math.pi
    pos = (step > 0).float().mean(-1)
    once = hue_winding(z_hues, dims).abs().round() == 1
    return torch.where(once, torch.maximum(pos, 1.0 - pos), torch.zeros_like(pos))


def plane_fraction(z: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """`(..., N, E)` → `(...)`: mean share of squared norm inside `dims`."""
    total = z.pow(2).sum(-1).clamp_min(1e-12)
    return (z[..., list(dims)].pow(2).sum(-1) / total).mean(-1)


def nearest_neighbour_spread(z: torch.Tensor) -> torch.Tensor:
    """`(..., N, E)` → `(...)` mean angle (degrees) to the nearest other point.

    One (N, N) similarity matrix at a time: all of them at once took 1 MB per seed at N = 512, which
    made evaluation, not training, the memory peak of a large ensemble."""
    u = F.normalize(z, dim=-1)
    flat = u.reshape(-1, *u.shape[-2:])
    eye = torch.eye(z.shape[-2], dtype=torch.bool)
    nearest = torch.stack([(x @ x.T).clamp(-1.0, 1.0).masked_fill(eye, -2.0).max(-1).values for x in flat])
    return torch.rad2deg(torch.arccos(nearest)).mean(-1).reshape(u.shape[:-2])


def vibrant_colours(n: int = 36) -> torch.Tensor:
    h = torch.arange(n) / n
    return hsv_to_rgb(torch.stack([h, torch.ones(n), torch.ones(n)], -1))


def structure_score(encode, dims: tuple[int, int], anchor: torch.Tensor | None = None,
                    exemplar: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per-seed structure numbers from `encode(rgb) → (seeds, ..., E)`."""
    with torch.no_grad():
        order = hue_order_agreement(hue_latents(encode), dims)
        planar = plane_fraction(encode(vibrant_colours()), dims)
        spread = nearest_neighbour_spread(encode(rgb_grid(8)))
        angle = None
        if anchor is not None and exemplar is not None:
            cos = F.cosine_similarity(encode(exemplar), anchor.expand(len(order), -1), dim=-1)
            angle = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    rows = []
    for i in range(len(order)):
        row = {"hue_order": float(order[i]), "vibrant_in_plane": float(planar[i]), "spread_deg": float(spread[i])}
        if angle is not None:
            row["anchor_angle_deg"] = float(angle[i])
        rows.append(row)
    return rows
