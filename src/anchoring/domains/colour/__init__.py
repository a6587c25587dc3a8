"""Colour domain: spaces, grids, named colours, concept labellers, similarity."""

from anchoring.domains.colour.grids import hsv_grid, hsv_weights, rgb_grid
from anchoring.domains.colour.labels import LABELLERS, Labeller, get_labeller
from anchoring.domains.colour.named import (
    GREY_NAMES,
    HUE_NAMES,
    NAMES,
    named_colours,
    named_rgb,
)
from anchoring.domains.colour.similarity import hsv_similarity
from anchoring.domains.colour.spaces import hsv_to_rgb, rgb_to_hsv

__all__ = [
    "GREY_NAMES", "HUE_NAMES", "LABELLERS", "Labeller", "NAMES", "get_labeller", "hsv_grid",
    "hsv_similarity", "hsv_to_rgb", "hsv_weights", "named_colours", "named_rgb", "rgb_grid",
    "rgb_to_hsv",
]
