"""The colour transformer kind (M3)."""

from anchoring.kinds.transformer.kind import KIND

__all__ = ["KIND"]
