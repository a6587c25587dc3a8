"""Concept labellers: a probability per colour, turned into fresh Bernoulli labels per batch.

Labels are deliberately sparse and noisy (pure red is labelled only 8% of the time), as in
method.md §2. Validation uses exact labels: the un-scaled score above a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from anchoring.domains.colour.spaces import rgb_to_hsv
from anchoring.errors import AnchoringError

Score = Callable[[torch.Tensor], torch.Tensor]


def redness(rgb: torch.Tensor) -> torch.Tensor:
    """1 for pure red, falling towards 0 as green/blue rise or red falls."""
    r, g, b = rgb.unbind(-1)
    return (r * (1.0 - g / 2.0 - b / 2.0)).clamp_min(0.0)


def vibrancy(rgb: torch.Tensor) -> torch.Tensor:
    """s·v: 1 for fully saturated bright colours, 0 for greys and black."""
    hsv = rgb_to_hsv(rgb)
    return hsv[..., 1] * hsv[..., 2]


def desaturation(rgb: torch.Tensor) -> torch.Tensor:
    """1 − s·v: 1 for greys and black."""
    return 1.0 - vibrancy(rgb)


@dataclass(frozen=True)
class Labeller:
    """p(label | colour) = scale · score(colour) ** power; exact label: score ** power ≥ threshold."""

    name: str
    score: Score
    scale: float
    power: float
    threshold: float = 0.5

    def probability(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.scale * self.score(rgb).pow(self.power)

    def exact(self, rgb: torch.Tensor) -> torch.Tensor:
        """Deterministic 0/1 labels for validation."""
        return (self.score(rgb).pow(self.power) >= self.threshold).float()


LABELLERS: dict[str, Labeller] = {
    "red": Labeller("red", redness, scale=0.08, power=8.0),
    "vibrant": Labeller("vibrant", vibrancy, scale=0.01, power=10.0),
    "desaturated": Labeller("desaturated", desaturation, scale=0.5, power=10.0),
    # dense, near-exact label for the curriculum experiments that predate sparse labels
    "saturated": Labeller("saturated", vibrancy, scale=1.0, power=20.0),
}


def get_labeller(name: str) -> Labeller:
    try:
        return LABELLERS[name]
    except KeyError:
        known = ", ".join(sorted(LABELLERS))
        raise AnchoringError(f"unknown labeller {name!r} (known: {known})") from None
