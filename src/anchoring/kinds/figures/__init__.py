"""The figure-only kind."""

from anchoring.kinds.figures.kind import KIND

__all__ = ["KIND"]
