"""The colour autoencoder kind."""

from anchoring.kinds.colour.kind import KIND
from anchoring.kinds.colour.model import ColourRun

__all__ = ["KIND", "ColourRun"]
