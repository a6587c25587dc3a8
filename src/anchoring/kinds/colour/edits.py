"""What an edit breaks, colour by colour: per-colour error on named colours and dense grids, selectivity."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from anchoring.domains.colour import (
    NAMES,
    hsv_grid,
    hsv_similarity,
    hsv_to_rgb,
    named_rgb,
    rgb_grid,
)
from anchoring.evaluate.control import selectivity
from anchoring.evaluate.stats import median
from anchoring.kinds.colour.metrics import concept_exemplar

Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # rgb (N, 3) -> (seeds, N, 3)


def colour_errors(reconstruct: Reconstruct, rgb: torch.Tensor) -> torch.Tensor:
    """Per-colour MSE `(seeds, N)`: mean over RGB of the squared error, output clamped to [0, 1]."""
    with torch.no_grad():
        return (reconstruct(rgb).clamp(0.0, 1.0) - rgb).pow(2).mean(-1)


def stacked(models: Sequence[nn.Module]) -> Reconstruct:
    return lambda x: torch.stack([m(x) for m in models])


def selectivity_grid() -> torch.Tensor:
    """Dense HSV grid for selectivity: 36 hues × 5 saturations × 5 values (greys repeated, as in HSV)."""
    return hsv_grid(36, 5, 5)[0]


def hue_curves(reconstruct: Reconstruct, values: Sequence[float] = (0.25, 0.5, 0.75, 1.0), hues: int = 72) -> torch.Tensor:
    """Error vs hue at full saturation for several values: `(seeds, len(values), hues)`."""
    h = torch.arange(hues) / hues
    rows = [colour_errors(reconstruct, hsv_to_rgb(torch.stack([h, torch.ones(hues), torch.full((hues,), v)], -1))) for v in values]
    return torch.stack(rows, dim=1)


def named_error_table(before: torch.Tensor, after: torch.Tensor, seeds: Sequence[int]) -> list[dict]:
    """Rows of (colour, median/min/max over seeds before and after): what the CLI prints."""
    rows = []
    for j, name in enumerate(NAMES):
        b, a = before[:, j], after[:, j]
        rows.append({"colour": name, "before": median(b.tolist()), "after": median(a.tolist()),
                     "after_min": float(a.min()), "after_max": float(a.max())})
    return rows


def concept_similarity(concept, grid: torch.Tensor) -> torch.Tensor:
    """How much each colour 'is' the concept: HSV similarity to its exemplar for a direction
    concept, the labeller's own score (e.g. s·v for vibrant) for a subspace concept."""
    if concept is None:
        return hsv_similarity(grid, named_rgb()[0].expand_as(grid))
    if concept.anchor is None and hasattr(concept.labeller, "score"):
        return concept.labeller.score(grid)
    exemplar = concept_exemplar(concept.labeller, named_rgb())
    return hsv_similarity(grid, exemplar.expand_as(grid))


def evaluate_edit(before: Reconstruct, after: Reconstruct, concept, k: float) -> dict[str, torch.Tensor]:
    """All per-seed numbers for one edit: named-colour errors, dense-grid errors, selectivity."""
    named = named_rgb()
    grid = selectivity_grid()
    sim = concept_similarity(concept, grid)
    after_grid = colour_errors(after, grid)
    cube = rgb_grid(8)
    return {
        "hsv_grid_before": colour_errors(before, grid).mean(-1),
        "hsv_grid_after": after_grid.mean(-1),
        "rgb_grid_before": colour_errors(before, cube).mean(-1),
        "rgb_grid_after": colour_errors(after, cube).mean(-1),
        "named_before": colour_errors(before, named),
        "named_after": colour_errors(after, named),
        "grid_after": after_grid,
        "selectivity": selectivity(after_grid, sim, k),
        "hue_after": hue_curves(after),
    }
