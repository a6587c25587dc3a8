"""Per-seed figures of a colour run: hue order, reconstruction, anchoring, structure score."""

from __future__ import annotations

import torch

from anchoring.domains.colour import named_colours
from anchoring.kinds.colour.metrics import anchor_cosine, concept_exemplar, hue_latents, hue_winding, hues_in_order
from anchoring.kinds.colour.structure import structure_score


def summarize_seeds(encode, reconstruct, cfg, objective, validation: torch.Tensor) -> list[dict]:
    """Per-seed structure and quality figures for a colour run; what the summary table shows.

    `encode(rgb)` → `(seeds, ..., E)`; `reconstruct(rgb)` → `(seeds, ..., 3)`.
    """
    seeds = cfg.train.member_seeds()
    dims = tuple(cfg.evaluate.hue_dims)
    zh = hue_latents(encode)
    order = hues_in_order(zh, dims)
    winding = hue_winding(zh, dims)
    mse = (reconstruct(validation).clamp(0, 1) - validation).pow(2).mean(dim=(-1, -2))
    rows = [{"seed": s, "hue_order": bool(order[i]), "hue_winding": round(float(winding[i]), 3),
             "val_mse": float(mse[i])} for i, s in enumerate(seeds)]
    concept = next((c for c in objective.concepts if c.name == cfg.evaluate.concept), None)
    has_anchor = concept is not None and concept.anchor is not None
    pure = concept_exemplar(concept.labeller, torch.cat([validation, torch.stack(list(named_colours().values()))])) if has_anchor else None
    scores = structure_score(encode, dims, torch.tensor(concept.anchor) if has_anchor else None, pure)
    for r, sc in zip(rows, scores):
        r["structure"] = sc
    if has_anchor:
        direction = torch.tensor(concept.anchor)
        cos = anchor_cosine(encode(pure), direction)
        exact = concept.labeller.exact(validation).bool()
        z_val = encode(validation)
        val_anchor = (1.0 - anchor_cosine(z_val[:, exact], direction)).mean(-1) if exact.any() else torch.zeros(len(seeds))
        for i, r in enumerate(rows):
            r["anchor_cos"] = float(cos[i])
            r["val_anchor_loss"] = float(val_anchor[i])
            r["anchored"] = (bool(order[i]) or not cfg.evaluate.hue_order) and float(cos[i]) >= cfg.evaluate.min_cosine
    return rows
