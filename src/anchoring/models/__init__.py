"""Plain nn.Modules; none of them knows about the anchoring method."""

from anchoring.models.colour_ae import ColourAutoencoder, L2Normalize
from anchoring.models.ngpt import NormalizedTransformer

__all__ = ["ColourAutoencoder", "L2Normalize", "NormalizedTransformer"]
