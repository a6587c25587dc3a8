"""Training the colour transformer: one seed, one arm (anchored or control), driven by a timeline.

Batches and label draws are a pure function of (seed, step), so the anchored model and its
unanchored control see exactly the same data, and a resumed run reproduces an uninterrupted
one. The control draws the labels too (and ignores them) to keep that true.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from anchoring.anchor import Capture, build_term, resolve_site
from anchoring.anchor.concepts import build_concepts
from anchoring.anchor.sequence import Positions, SequenceObjective, SequenceSite, SequenceTerm
from anchoring.anchor.terms import Concept
from anchoring.domains.colour import get_labeller
from anchoring.domains.colour_language import (
    ROLE,
    ColourLanguage,
    Lattice,
    draw_line_labels,
)
from anchoring.errors import AnchoringError
from anchoring.kinds.transformer.config import TransformerExperiment
from anchoring.models import NormalizedTransformer
from anchoring.schedule import Timeline
from anchoring.train.skeleton import MetricRows, fit
from anchoring.train.timeline import fit_steps, parse_schedule

PER_VECTOR = ("anchor", "anti-anchor", "subspace", "anti-subspace")  # kinds that make sense per token


def build_language(cfg: TransformerExperiment) -> ColourLanguage:
    lc = cfg.language
    return ColourLanguage(Lattice(lc.levels), lc.mix_rule, lc.held_out, lc.split_seed)


def build_transformer(cfg: TransformerExperiment, lang: ColourLanguage) -> NormalizedTransformer:
    t = cfg.transformer
    return NormalizedTransformer(lang.vocab_size, t.width, t.layers, t.heads, cfg.language.context, t.mlp_ratio,
                                 t.alpha, t.logit_scale)


def build_sequence_objective(cfg: TransformerExperiment, model: torch.nn.Module) -> SequenceObjective:
    """Validate every term against the model's modules and the sites' widths, naming the term."""
    width = cfg.transformer.width
    head_width = width // cfg.transformer.heads
    terms: list[SequenceTerm] = []
    by_width: dict[int, dict[str, Concept]] = {}
    for t in cfg.terms:
        label = t.name or (f"{t.kind}:{t.concept}" if t.concept else t.kind)
        if t.kind not in PER_VECTOR:
            raise AnchoringError(f"term {label!r}: {t.kind!r} is not available on sequences (use {', '.join(PER_VECTOR)})")
        resolve_site(model, t.site)
        if t.head is not None and t.head >= cfg.transformer.heads:
            raise AnchoringError(f"term {label!r}: head {t.head} is outside 0..{cfg.transformer.heads - 1}")
        w = head_width if t.head is not None else width
        if w not in by_width:
            by_width[w] = build_concepts(cfg.concepts, w, get_labeller)
        concepts = by_width[w]
        if t.concept is not None and t.concept not in concepts:
            raise AnchoringError(f"term {label!r} names unknown concept {t.concept!r} (defined: {', '.join(concepts) or 'none'})")
        base = build_term(t.kind, t.weight, latent_dim=w, site=t.site, concept=concepts.get(t.concept) if t.concept else None,
                          select=t.select, direction=t.direction, dims=t.dims, name=t.name)
        positions = Positions.parse(t.positions or "all", ROLE)
        if positions.kind == "mellowmax" and base.select != "labelled":
            raise AnchoringError(f"term {label!r}: mellowmax pools over labelled lines, so it needs select = 'labelled'")
        terms.append(SequenceTerm(base.name, t.kind, t.weight, SequenceSite(t.site, t.head), base.formula, positions,
                                  base.concept, base.select, base.params.get("direction")))
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise AnchoringError(f"term names must be unique on a transformer (got {names}); set `name`")
    concepts = next(iter(by_width.values())) if by_width else build_concepts(cfg.concepts, width, get_labeller)  # labellers, for label draws
    return SequenceObjective(concepts, terms)


def build_sequence_timeline(cfg: TransformerExperiment, objective: SequenceObjective) -> Timeline:
    timeline = parse_schedule(cfg.schedule, f"{cfg.name} schedule", objective.weight_names)
    if timeline.actions:
        step = min(timeline.actions)
        raise AnchoringError(f"schedule ACTION {timeline.actions[step][0]!r} at step {step}: transformer runs take no actions "
                             f"(they checkpoint every train.checkpoint_every steps)")
    return fit_steps(timeline, cfg.train.steps)


def batch_seed(seed: int, step: int) -> int:
    return (seed + 1) * 1_000_003 + step


@dataclass
class ArmResult:
    seed: int
    anchored: bool
    model: NormalizedTransformer
    metric_names: list[str]
    metrics: np.ndarray  # (steps, metrics)


class ArmTask(MetricRows):
    """One step of one model: a batch and its label draws from (seed, step), task loss plus the
    anchored arm's terms, Adam, then the weights back on the sphere."""

    def __init__(self, cfg: TransformerExperiment, seed: int, anchored: bool) -> None:
        self.cfg, self.seed = cfg, seed
        self.lang = build_language(cfg)
        torch.manual_seed(seed)
        self.model = build_transformer(cfg, self.lang)
        self.objective = build_sequence_objective(cfg, self.model)
        self.timeline = build_sequence_timeline(cfg, self.objective)
        self.terms = self.objective.terms if anchored else []
        self.table = self.timeline.table()
        self.col = {n: i for i, n in enumerate(self.timeline.names)}
        self.names = [*self.timeline.names, "loss", "task", *[t.name for t in self.objective.terms], "labelled_lines"]
        self.metric_names = ["loss", "task", *[t.name for t in self.terms]]  # what `step` returns
        self.steps = self.timeline.steps
        self.rows = np.full((self.steps, len(self.names)), np.nan)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.0, betas=cfg.train.betas)
        self.params = dict(self.model.named_parameters())
        self.concepts = list(self.objective.concepts.values())
        self.cap: Capture | None = None

    def lr(self, step: int) -> float:
        return float(self.table[step][self.col["lr"]])

    def step(self, step: int) -> torch.Tensor:
        lc, model, terms = self.cfg.language, self.model, self.terms
        g = torch.Generator().manual_seed(batch_seed(self.seed, step))
        batch = self.lang.batch(lc.batch_size, lc.context, g, op_weights=lc.op_weights)
        labels = {c.name: draw_line_labels(self.lang.lattice, c.labeller, batch.colours, g) for c in self.concepts}
        values = self.table[step]
        logits = model(batch.inputs)  # the hooks refresh cap.acts in this same pass
        task = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        term_values = [t(self.cap.acts, batch.roles, batch.line, labels) for t in terms]
        loss = task + sum((float(values[self.col[t.weight]]) * v for t, v in zip(terms, term_values)), torch.zeros(()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        model.normalize_weights()
        tv = {t.name: v.item() for t, v in zip(terms, term_values)}
        # lines drawn past the context's end have no position in the batch: their labels pull on nothing
        present = torch.zeros(batch.ops.shape, dtype=torch.bool).scatter_(1, batch.line, True)
        n_lab = sum(float((v.bool() & present).sum()) for v in labels.values())
        self.rows[step] = [*values, loss.item(), task.item(), *[tv.get(t.name, np.nan) for t in self.objective.terms], n_lab]
        return torch.tensor([loss.item(), task.item(), *tv.values()])


def train_arm(cfg: TransformerExperiment, seed: int, *, anchored: bool, checkpoint: Path | None = None,
              progress: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None) -> ArmResult:
    """Train one model; `progress(step)` after each step. Resumes from `checkpoint` if it exists.
    `should_stop` as in `fit`."""
    task = ArmTask(cfg, seed, anchored)
    report = (lambda done, _total: progress(done)) if progress is not None else None
    with Capture(task.model, [t.site.module for t in task.terms]) as cap:
        task.cap = cap
        task.model.train()
        fit(task, checkpoint=checkpoint, every=cfg.train.checkpoint_every, progress=report, should_stop=should_stop)
    task.model.eval()
    return ArmResult(seed, anchored, task.model, task.names, task.rows)
