"""Synthetic colour language for the transformer experiments (M3)."""

from anchoring.domains.colour_language.labels import (
           colour_probability,
           draw_line_labels,
)
from anchoring.domains.colour_language.language import (
           OPS,
           ROLE,
           ROLES,
           Batch,
           ColourLanguage,
)
from anchoring.domains.colour_language.lattice import Lattice

__all__ = ["OPS", "ROLE", "ROLES", "Batch", "ColourLanguage", "Lattice", "colour_probability", "draw_line_labels"]
