"""Plain nn.Modules; none of them knows about the anchoring method."""

from anchoring.models.colour_ae import ColourAutoencoder, L2Normalize

__all__ = ["ColourAutoencoder", "L2Normalize"]
