"""From a config to the pieces of the loss: concepts, terms, and the data they read."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from anchoring.anchor import Concept, Term, build_term
from anchoring.config import ExperimentConfig
from anchoring.domains.colour import (
    get_labeller,
    hsv_grid,
    hsv_weights,
    rgb_grid,
    rgb_to_hsv,
)
from anchoring.errors import AnchoringError
from anchoring.models import ColourAutoencoder
from anchoring.schedule import Timeline, parse_dopesheet

SCHEDULED = ("lr",)  # non-regularizer columns a schedule must provide
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


def build_model(cfg: ExperimentConfig) -> ColourAutoencoder:
    m = cfg.model
    return ColourAutoencoder(m.latent_dim, tuple(m.hidden), m.normalize, m.output)


def build_concepts(cfg: ExperimentConfig, width: int) -> dict[str, Concept]:
    """Concepts by name, with anchors checked against the width of the space they live in."""
    concepts: dict[str, Concept] = {}
    for c in cfg.concepts:
        if c.name in concepts:
            raise AnchoringError(f"concept {c.name!r} is defined twice")
        if c.anchor is not None and c.axis is not None:
            raise AnchoringError(f"concept {c.name!r}: give an anchor or an axis, not both")
        anchor = tuple(c.anchor) if c.anchor else None
        if c.axis is not None:
            if c.axis >= width:
                raise AnchoringError(f"concept {c.name!r}: axis {c.axis} is outside 0..{width - 1}")
            anchor = tuple(1.0 if i == c.axis else 0.0 for i in range(width))
        if anchor is not None and len(anchor) != width:
            raise AnchoringError(f"concept {c.name!r}: anchor has {len(anchor)} entries, the anchored space has {width}")
        labeller = get_labeller(c.labeller or c.name)
        if c.label_scale is not None:
            labeller = replace(labeller, scale=c.label_scale)
        dims = tuple(c.dims) if c.dims else ((c.axis,) if c.axis is not None else None)
        concepts[c.name] = Concept(c.name, labeller, anchor, dims)
    return concepts


def build_objective(cfg: ExperimentConfig) -> Objective:
    concepts = build_concepts(cfg, cfg.model.latent_dim)
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


def build_timeline(cfg: ExperimentConfig, objective: Objective) -> Timeline:
    """Parse the schedule and check it against the terms, both ways, naming the column."""
    timeline = parse_schedule(cfg, objective.weight_names, OPTIONAL)
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
    return fit_steps(cfg, timeline)


def parse_schedule(cfg: ExperimentConfig, weights: list[str], optional: tuple[str, ...] = ()) -> Timeline:
    """The dopesheet, with its columns checked against the term weights both ways (shared by every model kind)."""
    timeline = parse_dopesheet(cfg.schedule, source=f"{cfg.name} schedule")
    used = set(weights) | set(SCHEDULED) | set(optional)
    for col in timeline.names:
        if col not in used:
            raise AnchoringError(f"schedule column {col!r} is not used by any term (term weights: {', '.join(weights) or 'none'}; "
                                 f"other columns: {', '.join([*SCHEDULED, *optional])})")
    for col in [*SCHEDULED, *weights]:
        if col not in timeline.tracks:
            raise AnchoringError(f"schedule has no column {col!r} (needed by {'the optimiser' if col in SCHEDULED else 'a term'})")
    return timeline


def fit_steps(cfg: ExperimentConfig, timeline: Timeline) -> Timeline:
    """Stretch the timeline to `train.steps` when the run asks for another length."""
    if cfg.train.steps is not None and cfg.train.steps != timeline.steps:
        return timeline.rescaled(cfg.train.steps)
    return timeline


def check_curriculum(cfg: ExperimentConfig, timeline: Timeline) -> None:
    """With an `extent` column, the smallest extent must still leave some point to sample."""
    if "extent" not in timeline.tracks:
        return
    from anchoring.domains.colour.curriculum import curriculum_depth, curriculum_weights

    points, weights = training_points(cfg)
    lowest = float(timeline.table()[:, timeline.names.index("extent")].min())
    if float((weights * curriculum_weights(curriculum_depth(points), lowest)).sum()) == 0:
        raise AnchoringError(f"curriculum: at extent {lowest:g} no training point has any weight (depth 0 = the six primaries/secondaries)")


def training_points(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(points `(N, 3)` RGB, sampling weights `(N,)`) for the configured grid."""
    d = cfg.data
    if d.space == "rgb":
        pts = rgb_grid(d.rgb_levels)
        weights = hsv_weights(rgb_to_hsv(pts)) if d.weights == "chroma" else torch.ones(len(pts))
    else:
        pts, hsv = hsv_grid(*d.hsv_shape)
        weights = hsv_weights(hsv) if d.weights == "chroma" else torch.ones(len(pts))
    return pts, weights
