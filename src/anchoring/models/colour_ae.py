"""MLP colour autoencoder: RGB → small bottleneck → (optional) unit sphere → RGB."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn


class L2Normalize(nn.Module):
    """Project onto the unit sphere; its own module so hooks can name the normalised latent."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / z.norm(dim=-1, keepdim=True).clamp_min(self.eps)


def _mlp(sizes: Sequence[int], final_activation: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    if final_activation is not None:
        layers.append(final_activation)
    return nn.Sequential(*layers)


class ColourAutoencoder(nn.Module):
    """3 → hidden (GELU) → E → [L2 norm] → mirrored hidden → 3.

    Named sites for hooks: `encoder` (pre-normalisation bottleneck), `latent` (after the
    optional normalisation; identity when it is off), `decoder`.
    """

    def __init__(
        self,
        latent_dim: int = 4,
        hidden: Sequence[int] = (16,),
        normalize: bool = True,
        output: Literal["linear", "sigmoid"] = "linear",
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp([3, *hidden, latent_dim], None)
        self.latent: nn.Module = L2Normalize() if normalize else nn.Identity()
        self.decoder = _mlp([latent_dim, *reversed(list(hidden)), 3], nn.Sigmoid() if output == "sigmoid" else None)

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.latent(self.encoder(rgb))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(rgb))
