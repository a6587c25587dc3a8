"""Colour-autoencoder metrics: does the anchored structure exist, and how well does it reconstruct?"""

from __future__ import annotations

import math

import torch

from anchoring.domains.colour import HUE_NAMES, named_colours


def anchor_cosine(z: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """cos(z, v̂) over the last dim; `z` is `(..., E)`."""
    v = direction / direction.norm()
    return (z * v).sum(-1) / z.norm(dim=-1).clamp_min(1e-12)


def hue_winding(z_hues: torch.Tensor, dims: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Signed number of turns made by walking the hues in order around the `dims` plane.

    `z_hues` is `(..., H, E)` with hues in hue order. ±1 means the hues sit around the
    plane's origin in order (either orientation); 0 or ±2 means they do not.
    """
    angle = torch.atan2(z_hues[..., dims[1]], z_hues[..., dims[0]])
    step = torch.diff(torch.cat([angle, angle[..., :1]], dim=-1), dim=-1)
    step = (step + math.pi) % (2 * math.pi) - math.pi
    return step.sum(-1) / (2 * math.pi)


def hues_in_order(z_hues: torch.Tensor, dims: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """True where the hues go once around the plane, each one step further in the same direction.

    Stricter than the winding number: every consecutive step must turn the same way, so
    two swapped neighbours fail even if the loop still closes.
    """
    angle = torch.atan2(z_hues[..., dims[1]], z_hues[..., dims[0]])
    step = torch.diff(torch.cat([angle, angle[..., :1]], dim=-1), dim=-1)
    step = (step + math.pi) % (2 * math.pi) - math.pi
    same_sign = (step > 0).all(-1) | (step < 0).all(-1)
    return same_sign & (hue_winding(z_hues, dims).abs().round() == 1)


def hue_latents(encode) -> torch.Tensor:
    """Latents of the 12 named hues, `(seeds, 12, E)`, from an `encode(rgb)` function."""
    named = named_colours()
    return encode(torch.stack([named[n] for n in HUE_NAMES]))


def concept_exemplar(labeller, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate colour the labeller is surest about (pure red for `red`)."""
    return candidates[labeller.probability(candidates).argmax()]
