"""Relearning attack: does a deleted concept come back after a little fine-tuning?

Fine-tune an edited model on K samples of the concept (plus optional retain data) and record
the concept's error after every step. The baseline is the same architecture trained with no
anchoring, with the concept direction found post hoc (difference of means) and projected out
of the weights. The task's loss and error come from the caller, so this knows no model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from anchoring.control.erasure import mean_difference


def concept_samples(labeller, pool: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K distinct colours drawn from `pool` with probability ∝ p(concept | colour)."""
    p = labeller.probability(pool).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(p / p.sum(), k, replacement=False, generator=g)
    return pool[idx]


def post_hoc_direction(encode, labeller, pool: torch.Tensor) -> torch.Tensor:
    """Mean latent of exactly-labelled colours minus mean of the rest, unit length.

    `encode(rgb)` gives the site's activations; use the pre-normalisation site so the
    direction can be projected out of the producing layer's weights.
    """
    with torch.no_grad():
        z = encode(pool)
    return mean_difference(z, labeller.exact(pool))


@dataclass
class Curve:
    errors: torch.Tensor  # (steps + 1,), error on the concept's colours before each step and after the last

    def steps_to(self, threshold: float) -> int | None:
        hit = (self.errors <= threshold).nonzero()
        return int(hit[0]) if len(hit) else None


def relearn(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], error: Callable[[nn.Module], torch.Tensor],
            steps: int, lr: float = 0.01) -> Curve:
    """Fine-tune a copy with Adam on `loss(model)` (full batch); `error(model)` measured before each
    step and after the last. Any model, any task: the caller says what is learned and what is measured."""
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    errors = []
    for _ in range(steps + 1):
        m.eval()  # measured as it would be used (dropout off, running statistics frozen) ...
        with torch.no_grad():
            errors.append(error(m).detach())
        if len(errors) > steps:
            break
        m.train()  # ... and trained as in training
        opt.zero_grad(set_to_none=True)
        loss(m).backward()
        opt.step()
    return Curve(torch.stack(errors))
