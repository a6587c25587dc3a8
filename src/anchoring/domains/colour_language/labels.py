"""Line-level concept labels: each operand of a line may draw the label; the line carries it if any does.

Drawn like the autoencoder's labels (sparse, noisy, fresh every batch). Only operands draw:
when answers drew too, `~ cyan = red` was labelled, and the soft-minimum pooling sometimes
pulled *cyan* (the operand) to red's anchor — cyan's alignment rose to 0.4 in a short run.
"""

from __future__ import annotations

import torch

from anchoring.domains.colour.labels import Labeller
from anchoring.domains.colour_language.lattice import Lattice


def colour_probability(lattice: Lattice, labeller: Labeller, colours: torch.Tensor) -> torch.Tensor:
    """p(label) of each colour token in `colours` (any shape); −1 (no colour) gets 0."""
    p = labeller.probability(lattice.rgb(colours.clamp_min(0)))
    return torch.where(colours >= 0, p, torch.zeros_like(p))


def draw_line_labels(lattice: Lattice, labeller: Labeller, colours: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`(B, K)` 0/1 from `colours` `(B, K, 3)` (a, b, answer): a line is labelled if an operand draws."""
    p = colour_probability(lattice, labeller, colours[..., :2])
    hit = torch.rand(p.shape, generator=generator) < p
    return hit.any(-1).float()

