"""The language-model kind (M4): a normalised transformer on text, a concept anchored on a residual axis."""

from anchoring.kinds.lm.kind import KIND

__all__ = ["KIND"]
