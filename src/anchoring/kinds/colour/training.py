"""Training the colour autoencoder: every seed of one configuration in lockstep, as one task of
the shared training skeleton (`anchoring.train.skeleton.fit`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from anchoring.anchor import Capture
from anchoring.domains.colour import rgb_grid
from anchoring.domains.colour.curriculum import curriculum_depth, curriculum_weights
from anchoring.errors import AnchoringError
from anchoring.kinds.colour.config import ColourExperiment
from anchoring.kinds.colour.objective import (
    Objective,
    build_model,
    build_objective,
    build_timeline,
    training_points,
)
from anchoring.schedule import Timeline
from anchoring.schedule.reactive import Decision, Reactive, apply
from anchoring.train.checkpoint import CHECKPOINT
from anchoring.train.data import EnsembleStream, WeightedPoints
from anchoring.train.ensemble import Ensemble
from anchoring.train.skeleton import Progress, fit

SNAPSHOT_SITE = "latent"
Callback = Callable[[int, "TrainResult"], None]


@dataclass
class TrainResult:
    config: ColourExperiment
    ensemble: Ensemble
    objective: Objective
    timeline: Timeline
    metric_names: list[str]
    metrics: torch.Tensor  # (steps, seeds, metrics)
    snapshot_points: torch.Tensor  # (N, 3) RGB
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (seeds, N, E)
    decisions: list = field(default_factory=list)  # reactive re-targets, in order
    steps_done: int = 0
    fast: bool = False  # trained through the stacked-matmul path

    @property
    def seeds(self) -> list[int]:
        return self.ensemble.seeds


class ColourTask:
    """One step of the colour ensemble: sample a batch per seed, draw labels, one fused Adam step.

    Batches are a pure function of (seed, step) and the optimiser state is checkpointed whole, so
    a resumed run is bit-identical to an uninterrupted one.
    """

    def __init__(self, cfg: ColourExperiment) -> None:
        self.cfg = cfg
        self.objective = objective = build_objective(cfg)
        self.timeline = timeline = build_timeline(cfg, objective)
        self.member_seeds = seeds = cfg.train.member_seeds()  # one per row of the metrics
        self.ensemble = ensemble = Ensemble(lambda: build_model(cfg), seeds)
        self.points, self.weights = training_points(cfg)
        self.sampler = WeightedPoints(self.points, self.weights)
        self.probs = (torch.stack([c.labeller.probability(self.points) for c in objective.concepts])
                      if objective.concepts else torch.zeros(0, len(self.points)))
        self.names = [c.name for c in objective.concepts]
        self.stream = EnsembleStream(seeds, cfg.data.batch_size, len(self.names))
        self.params = ensemble.params
        self.optimizer = torch.optim.Adam(list(ensemble.params.values()), lr=0.0, betas=cfg.train.betas, fused=True)
        self.steps = timeline.steps
        self.table = torch.from_numpy(timeline.table())
        self.col = {n: i for i, n in enumerate(timeline.names)}
        self.extent_col = self.col.get("extent")
        self.depth = curriculum_depth(self.points) if self.extent_col is not None else None
        self.last_extent: float | None = None
        self.controllers = [Reactive(**{**r.model_dump(), "highest": r.highest if r.highest is not None else float("inf")})
                            for r in cfg.reactive]
        self.steered = [(self.col[c.param], c.param) for c in self.controllers]
        self.extent_steered = any(c.param == "extent" for c in self.controllers)
        self.term_cols = torch.tensor([self.col[t.weight] for t in objective.terms], dtype=torch.long)
        self.metric_names = ["loss", "recon", *[t.name for t in objective.terms]]
        self.masks = None
        if cfg.train.term_masks is not None:  # per-member term subsets (one ensemble, many objectives)
            if any(len(m) != len(objective.terms) for m in cfg.train.term_masks):
                raise AnchoringError(f"term_masks rows must have one entry per term ({len(objective.terms)})")
            self.masks = torch.tensor(cfg.train.term_masks, dtype=torch.float32)
        self.result = TrainResult(cfg, ensemble, objective, timeline, self.metric_names,
                                  torch.full((self.steps, len(seeds), len(self.metric_names)), float("nan")), rgb_grid(8))
        self.snap_x = self.result.snapshot_points.expand(len(seeds), -1, -1)
        self.cap: Capture | None = None
        # the same loss on all members at once: terms take (..., N, D), so they need no vmap
        self.fast = ensemble.fast_path(objective.sites) if cfg.train.fast else None
        self.result.fast = self.fast is not None
        self._row: torch.Tensor | None = None

    # --- the Task protocol -------------------------------------------------------------
    def lr(self, step: int) -> float:
        row = self.table[step]
        if self.steered:  # live values for columns a controller may have re-targeted
            row = row.clone()
            for c, name in self.steered:
                row[c] = self.timeline.tracks[name](step)
        self._row = row
        return float(row[self.col["lr"]])

    def batch(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Points `(seeds, B, 3)` and Bernoulli labels per concept, a pure function of (seed, step):
        a label is redrawn every time a point is drawn, with the labeller's probability."""
        if self.extent_col is not None:
            # a controller may steer the curriculum's extent too: read the live track, not the cached table
            extent = (self.timeline.tracks["extent"](step) if self.extent_steered
                      else float(self.table[step, self.extent_col]))
            if extent != self.last_extent:
                self.last_extent = extent
                self.sampler.set_weights(self.weights * curriculum_weights(self.depth, extent))
        u = self.stream(step)
        idx = self.sampler.indices(u[..., 0])
        labels = {n: (u[..., 1 + i] < self.probs[i][idx]).float() for i, n in enumerate(self.names)}
        return self.points[idx], labels

    def step(self, step: int) -> torch.Tensor:
        x, labels = self.batch(step)
        w = self._row[self.term_cols].float()
        self.optimizer.zero_grad(set_to_none=True)
        recon, values = self._loss(x, labels)
        total = recon + (values @ w if self.masks is None else (values * (self.masks * w)).sum(-1))
        total.sum().backward()
        self.optimizer.step()
        row = torch.cat([total.detach()[:, None], recon.detach()[:, None], values.detach()], dim=1)
        self.result.metrics[step] = row
        self.result.steps_done = step + 1
        return row

    def after_step(self, step: int) -> bool:
        result, timeline = self.result, self.timeline
        # controllers decide before any checkpoint, so a resumed run replays the same decisions
        for c in self.controllers:
            window = result.metrics[max(0, step + 1 - c.every): step + 1, :, self.metric_names.index(c.metric)]
            d = c.decide(step + 1, window, timeline)
            if d is not None:
                apply(timeline, d)
                result.decisions.append(d)
        actions = timeline.actions_at(step)
        every = self.cfg.train.snapshot_every
        if (every and (step + 1) % every == 0) or "snapshot" in actions or step + 1 == self.steps:
            self.snapshot(step + 1)
        return "checkpoint" in actions

    def state(self, steps_done: int) -> dict[str, torch.Tensor]:
        result = self.result
        extra = {"metrics": result.metrics[:steps_done]}
        if result.decisions:
            extra["reactive"] = torch.tensor([[self.col[d.param], d.at, d.value, d.until] for d in result.decisions],
                                             dtype=torch.float64)
        extra.update({f"snap.{s}": z for s, z in result.snapshots.items()})
        return extra

    def restore(self, steps_done: int, tensors: dict[str, torch.Tensor]) -> None:
        result = self.result
        result.metrics[:steps_done] = tensors["metrics"][:steps_done]
        result.steps_done = steps_done
        result.snapshots = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("snap.")}
        for row in tensors.get("reactive", torch.zeros(0, 4)).tolist():  # replay the controllers' decisions
            d = Decision(self.timeline.names[int(row[0])], int(row[1]), row[2], int(row[3]))
            apply(self.timeline, d)
            result.decisions.append(d)

    # --- helpers -----------------------------------------------------------------------
    def snapshot(self, step: int) -> None:
        self.result.snapshots[step] = self.ensemble.capture_at(SNAPSHOT_SITE, self.snap_x)

    def _member_loss(self, out, acts, x, labels):
        recon = (out - x).pow(2).mean()
        values = torch.stack([t(acts, labels) for t in self.objective.terms]) if self.objective.terms else out.new_zeros(0)
        return recon, values

    def _loss(self, x, labels):
        if self.fast is None:
            return self.ensemble.run(self._member_loss, self.cap, x, labels)
        out, acts = self.fast(self.ensemble.params, x)
        recon = (out - x).pow(2).mean((-2, -1))
        terms = self.objective.terms
        values = torch.stack([t(acts, labels) for t in terms], -1) if terms else out.new_zeros(len(out), 0)
        return recon, values


def train(
    cfg: ColourExperiment,
    run_dir: Path | None = None,
    *,
    progress: Progress | None = None,
    callbacks: Iterable[Callback] = (),
) -> TrainResult:
    """Train every seed of `cfg` together; with `run_dir`, checkpoint there and resume from it.

    `progress(done, total)` is called after each step; `callbacks(step, result)` too (tests and
    the sweep's fault injection use them).
    """
    task = ColourTask(cfg)
    ckpt = run_dir / CHECKPOINT if run_dir is not None else None
    cbs = tuple((lambda step, cb=cb: cb(step, task.result)) for cb in callbacks)
    with Capture(task.ensemble.template, task.objective.sites) as cap:
        task.cap = cap
        if not (ckpt is not None and ckpt.is_file()) and cfg.train.snapshot_every:
            task.snapshot(0)
        fit(task, checkpoint=ckpt, every=cfg.train.checkpoint_every, progress=progress, run_dir=run_dir, callbacks=cbs)
    return task.result


def metrics_table(result: TrainResult) -> np.ndarray:
    """Long format rows: step, seed, lr, one column per schedule weight, then each metric."""
    steps, n_seeds, _ = result.metrics.shape
    sched = result.timeline.table()
    rows = []
    for i, seed in enumerate(result.seeds):
        block = np.column_stack([np.arange(steps), np.full(steps, seed), sched, result.metrics[:, i].numpy()])
        rows.append(block)
    return np.concatenate(rows)[: steps * n_seeds]
