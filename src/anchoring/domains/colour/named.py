"""The 17 named colours every results table uses: 12 hues every 30° from red, 5 greys."""

from __future__ import annotations

import torch

from anchoring.domains.colour.spaces import hsv_to_rgb

HUE_NAMES: tuple[str, ...] = (
    "red", "orange", "yellow", "lime", "green", "teal",
    "cyan", "azure", "blue", "purple", "magenta", "pink",
)
GREY_NAMES: tuple[str, ...] = ("black", "dark grey", "grey", "light grey", "white")
NAMES: tuple[str, ...] = HUE_NAMES + GREY_NAMES


def named_colours() -> dict[str, torch.Tensor]:
    """Name → RGB `(3,)`, hues fully saturated at full value, greys evenly spaced."""
    hsv = torch.tensor([[i / 12.0, 1.0, 1.0] for i in range(12)])
    hues = hsv_to_rgb(hsv)
    greys = torch.linspace(0.0, 1.0, len(GREY_NAMES)).unsqueeze(-1).expand(-1, 3)
    table = torch.cat([hues, greys], dim=0)
    return {name: table[i] for i, name in enumerate(NAMES)}


def named_rgb() -> torch.Tensor:
    """`(17, 3)` RGB in the order of `NAMES`."""
    return torch.stack(list(named_colours().values()))
