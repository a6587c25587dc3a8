"""Colours as tokens: an RGB lattice of `levels³` points, and the operations on it.

Arithmetic happens on integer channel levels (0 … levels−1), so every answer is exactly
one token and ties in a mean round the same way every time (half up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchoring.errors import AnchoringError


@dataclass(frozen=True)
class Lattice:
    """Token id t ↔ channel levels (r, g, b) with t = (r·L + g)·L + b."""

    levels: int = 6

    def __post_init__(self) -> None:
        if not 2 <= self.levels <= 10:  # a colour's word has one digit per channel
            raise AnchoringError(f"lattice levels must be within 2..10, got {self.levels}")

    @property
    def size(self) -> int:
        return self.levels**3

    def channels(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(..., 3)` integer levels of colour tokens."""
        L = self.levels
        return torch.stack([tokens // (L * L), (tokens // L) % L, tokens % L], dim=-1)

    def token(self, channels: torch.Tensor) -> torch.Tensor:
        L = self.levels
        return (channels[..., 0] * L + channels[..., 1]) * L + channels[..., 2]

    def rgb(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`(..., 3)` RGB in [0, 1] (every colour when `tokens` is None)."""
        if tokens is None:
            tokens = torch.arange(self.size)
        return self.channels(tokens).float() / (self.levels - 1)

    def mix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-channel mean of two colours, rounded half up to the lattice."""
        s = self.channels(a) + self.channels(b)
        return self.token(torch.div(s + 1, 2, rounding_mode="floor"))

    def complement(self, a: torch.Tensor) -> torch.Tensor:
        """Each channel mirrored: level ↦ L−1−level (red ↔ cyan, black ↔ white)."""
        return self.token(self.levels - 1 - self.channels(a))

    def lighten(self, a: torch.Tensor) -> torch.Tensor:
        """Each channel one level up, saturating at the top (white stays white)."""
        return self.token((self.channels(a) + 1).clamp_max(self.levels - 1))

    def mix_is_exact(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """True where the mean needs no rounding (every channel sum even)."""
        return ((self.channels(a) + self.channels(b)) % 2 == 0).all(-1)
