"""Where an LM run keeps its concept: the residual sites its terms anchor at, and the direction (or the
dims of a subspace) that alignment is measured along and the edits remove. Both are read from the
config through the objective training builds, so a term's own direction wins over the concept's, as
it does in training."""

from __future__ import annotations

import torch

from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.training import build_model, build_objective


def measured_direction(cfg: LMExperiment, fallback: bool = True) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """The concept's anchor (axis or vector), else its dims: what alignment is measured against, in every arm.
    A run that anchors nothing is measured along axis 0 for reference; with `fallback=False` (an edit
    needs the concept's own direction) it is an error instead."""
    model = build_model(cfg, 8)
    objective = build_objective(cfg, model)
    anchors = objective.anchors(cfg.text.concept)  # what the anchor terms actually pull towards (a term's own
    if anchors:                                    # direction wins over the concept's), as training uses it
        return anchors[0][1].clone(), None
    c = objective.concepts.get(cfg.text.concept)
    if c is not None and c.anchor is not None:
        return torch.tensor(c.anchor), None
    if c is not None and c.dims:
        return None, c.dims
    if not fallback:  # axis 0 is where alignment is read for reference, not the concept
        raise AnchoringError(f"this run anchors nothing for {cfg.text.concept!r} (no anchor, dims or anchor term), "
                             f"so it has no direction to edit")
    v = torch.zeros(cfg.lm.width)
    v[0] = 1.0  # nothing anchored: axis 0, for reference
    return v, None


def anchored_sites(cfg: LMExperiment) -> list[str]:
    model = build_model(cfg, 8)
    return sorted({t.site.module for t in build_objective(cfg, model).terms if t.kind in ("anchor", "subspace")})
