"""From a colour config to the pieces of the loss: concepts, terms, and the data they read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchoring.anchor import Concept, Term, build_term
from anchoring.anchor.concepts import build_concepts
from anchoring.domains.colour import (
    get_labeller,
    hsv_grid,
    hsv_weights,
    rgb_grid,
    rgb_to_hsv,
)
from anchoring.errors import AnchoringError
from anchoring.kinds.colour.config import ColourExperiment
from anchoring.models import ColourAutoencoder
from anchoring.schedule import Timeline
from anchoring.train.timeline import fit_steps, parse_schedule

OPTIONAL = ("extent",)  # columns with a meaning of their own: extent drives the data curriculum
ACTIONS = ("snapshot", "checkpoint")  # events a dopesheet ACTION cell may fire


@dataclass
class Objective:
    concepts: list[Concept]
    terms: list[Term]

    @property
    def sites(self) -> list[str]:
        return sorted({t.site for t in self.terms})

    @property
    def weight_names(self) -> list[str]:
        return list(dict.fromkeys(t.weight for t in self.terms))


def build_model(cfg: ColourExperiment) -> ColourAutoencoder:
    m = cfg.model
    return ColourAutoencoder(m.latent_dim, tuple(m.hidden), m.normalize, m.output)


def build_objective(cfg: ColourExperiment) -> Objective:
    concepts = build_concepts(cfg.concepts, cfg.model.latent_dim, get_labeller)
    terms: list[Term] = []
    for t in cfg.terms:
        if t.positions is not None or t.head is not None:
            raise AnchoringError(f"term {t.name or t.kind!r}: positions/head apply to transformer experiments only")
        for ref in (t.concept, t.toward):
            if ref is not None and ref not in concepts:
                raise AnchoringError(f"term {t.kind!r} names unknown concept {ref!r} (defined: {', '.join(concepts) or 'none'})")
        terms.append(build_term(t.kind, t.weight, latent_dim=cfg.model.latent_dim, site=t.site,
                                concept=concepts.get(t.concept) if t.concept else None, select=t.select,
                                direction=t.direction, dims=t.dims, name=t.name,
                                toward=concepts.get(t.toward) if t.toward else None, **t.options()))
    names = [t.name for t in terms]
    for i, t in enumerate(terms):  # metric columns must be unique
        if names.count(t.name) > 1:
            t.name = f"{t.name}#{names[: i + 1].count(t.name)}"
    return Objective(list(concepts.values()), terms)


def build_timeline(cfg: ColourExperiment, objective: Objective) -> Timeline:
    """Parse the schedule and check it against the terms, both ways, naming the column."""
    timeline = parse_schedule(cfg.schedule, f"{cfg.name} schedule", objective.weight_names, OPTIONAL)
    if "extent" in timeline.tracks:  # a share of the curriculum's depth: outside [0, 1] it silently clips
        vals = [v for _, v in timeline.tracks["extent"].key_values()]
        if min(vals) < 0 or max(vals) > 1:
            raise AnchoringError(f"{cfg.name} schedule: extent must lie in [0, 1] at every key, got "
                                 f"{min(vals):g} to {max(vals):g}")
    for step, acts in timeline.actions.items():
        for a in acts:
            if a not in ACTIONS:
                raise AnchoringError(f"schedule ACTION {a!r} at step {step} is unknown (known: {', '.join(ACTIONS)})")
    metrics = ["loss", "recon", *[t.name for t in objective.terms]]
    for r in cfg.reactive:
        if r.param not in timeline.tracks:
            raise AnchoringError(f"reactive: schedule has no column {r.param!r} to steer")
        if r.metric not in metrics:
            raise AnchoringError(f"reactive: unknown metric {r.metric!r} (metrics: {', '.join(metrics)})")
    return fit_steps(timeline, cfg.train.steps)


def check_curriculum(cfg: ColourExperiment, timeline: Timeline) -> None:
    """With an `extent` column, the smallest extent must still leave some point to sample."""
    if "extent" not in timeline.tracks:
        return
    from anchoring.domains.colour.curriculum import curriculum_depth, curriculum_weights

    points, weights = training_points(cfg)
    lowest = float(timeline.table()[:, timeline.names.index("extent")].min())
    if float((weights * curriculum_weights(curriculum_depth(points), lowest)).sum()) == 0:
        raise AnchoringError(f"curriculum: at extent {lowest:g} no training point has any weight (depth 0 = the six primaries/secondaries)")


def training_points(cfg: ColourExperiment) -> tuple[torch.Tensor, torch.Tensor]:
    """(points `(N, 3)` RGB, sampling weights `(N,)`) for the configured grid."""
    d = cfg.data
    if d.space == "rgb":
        pts = rgb_grid(d.rgb_levels)
        weights = hsv_weights(rgb_to_hsv(pts)) if d.weights == "chroma" else torch.ones(len(pts))
    else:
        pts, hsv = hsv_grid(*d.hsv_shape)
        weights = hsv_weights(hsv) if d.weights == "chroma" else torch.ones(len(pts))
    return pts, weights
