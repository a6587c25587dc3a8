"""Edits of an LM run's models by the concept's anchor: suppression through hooks at the anchored
sites, and deletion of the direction from the weights (no hook needed afterwards)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from anchoring.control import Constant, Intervention, intervene
from anchoring.control.surgery import project_out
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.kind import anchored_sites, measured_direction

EDITS = ("suppress", "delete")


def concept_directions(cfg: LMExperiment) -> list[torch.Tensor]:
    """The concept's anchor, or one basis axis per dim of its subspace."""
    v, dims = measured_direction(cfg)
    if v is not None:
        return [v / v.norm()]
    return [torch.eye(cfg.lm.width)[d] for d in dims or ()]


class Suppressed(nn.Module):
    """A model whose anchored sites have the concept's half-space projected out on every forward."""

    def __init__(self, model: nn.Module, sites: list[str], directions: list[torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.sites, self.directions = model, sites, directions
        self.context = getattr(model, "context", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with ExitStack() as stack:
            for site in self.sites:
                for v in self.directions:
                    edit = Intervention("suppress", tuple(v.tolist()), None, Constant())
                    stack.enter_context(intervene(self.inner, site, edit))
            return self.inner(tokens)


def edited(model: nn.Module, cfg: LMExperiment, edit: str) -> nn.Module:
    """`model` under `edit` (suppress | delete), for any arm: the anchored arm's own anchor."""
    if edit not in EDITS:
        raise AnchoringError(f"--edit must be one of {', '.join(EDITS)}, not {edit!r}")
    directions = concept_directions(cfg)
    if edit == "suppress":
        sites = anchored_sites(cfg)
        if not sites:
            raise AnchoringError("this run anchors nothing, so there is no site to suppress at")
        return Suppressed(model, sites, directions).eval()
    embeddings, writers = model.residual_writers()
    out = model
    for v in directions:
        out = project_out(out, v, embeddings, writers)
    return out.eval()
