"""The training loop: every seed of one configuration in lockstep, driven by the timeline."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from anchoring.anchor import Capture
from anchoring.config import ExperimentConfig
from anchoring.domains.colour import rgb_grid
from anchoring.domains.colour.curriculum import curriculum_depth, curriculum_weights
from anchoring.errors import AnchoringError
from anchoring.schedule import Timeline
from anchoring.schedule.reactive import Decision, Reactive, apply
from anchoring.train.checkpoint import (
    read_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from anchoring.train.data import EnsembleStream, WeightedPoints
from anchoring.train.ensemble import Ensemble
from anchoring.train.objective import (
    Objective,
    build_model,
    build_objective,
    build_timeline,
    training_points,
)

CHECKPOINT = "checkpoint.safetensors"
SNAPSHOT_SITE = "latent"
Callback = Callable[[int, "TrainResult"], None]


class TrainingInterrupted(Exception):
    """Raised after a clean stop (Ctrl-C / SIGTERM): the checkpoint holds every finished step."""

    def __init__(self, step: int, run_dir: Path | None = None) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step, self.run_dir = step, run_dir


@dataclass
class TrainResult:
    config: ExperimentConfig
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


def _seeds(cfg: ExperimentConfig) -> list[int]:
    return cfg.train.member_seeds()


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so state stays whole."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, *_: object) -> None:
        if self.set:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero while training.

    Terms like s^100 of cosines produce values below 1e-38, and CPU arithmetic on denormals is
    several times slower (the separation term's pow went from ~5 ms to ~1 ms at E=60). Losing
    values that small changes nothing measurable; the flag is switched back off afterwards.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def train(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    callbacks: Iterable[Callback] = (),
) -> TrainResult:
    """Train `cfg.train.seeds` seeds together; checkpoint into `run_dir` if given.

    With `resume`, continue from `run_dir`'s checkpoint; the result is bit-identical to an
    uninterrupted run because batches are a pure function of (seed, step) and the optimiser
    state is saved whole. `progress(done, total)` is called after each step.
    """
    objective = build_objective(cfg)
    timeline = build_timeline(cfg, objective)
    seeds = _seeds(cfg)
    ensemble = Ensemble(lambda: build_model(cfg), seeds)
    points, weights = training_points(cfg)
    sampler = WeightedPoints(points, weights)
    probs = torch.stack([c.labeller.probability(points) for c in objective.concepts]) if objective.concepts else torch.zeros(0, len(points))
    names = [c.name for c in objective.concepts]
    stream = EnsembleStream(seeds, cfg.data.batch_size, len(names))
    optimizer = torch.optim.Adam(list(ensemble.params.values()), lr=0.0, betas=cfg.train.betas, fused=True)

    table = torch.from_numpy(timeline.table())
    col = {n: i for i, n in enumerate(timeline.names)}
    extent_col = col.get("extent")
    if extent_col is not None:  # data curriculum: sampling weights follow the `extent` column
        depth = curriculum_depth(points)
    last_extent = None
    controllers = [Reactive(**r.model_dump()) for r in cfg.reactive]
    steered = [(col[c.param], c.param) for c in controllers]
    lr_col = col["lr"]
    term_cols = torch.tensor([col[t.weight] for t in objective.terms], dtype=torch.long)
    metric_names = ["loss", "recon", *[t.name for t in objective.terms]]
    masks = None
    if cfg.train.term_masks is not None:  # per-member term subsets (one ensemble, many objectives)
        if any(len(m) != len(objective.terms) for m in cfg.train.term_masks):
            raise AnchoringError(f"term_masks rows must have one entry per term ({len(objective.terms)})")
        masks = torch.tensor(cfg.train.term_masks, dtype=torch.float32)
    steps = timeline.steps
    result = TrainResult(cfg, ensemble, objective, timeline, metric_names,
                         torch.full((steps, len(seeds), len(metric_names)), float("nan")), rgb_grid(8))
    snap_x = result.snapshot_points.expand(len(seeds), -1, -1)

    start = 0
    ckpt = run_dir / CHECKPOINT if run_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise AnchoringError(f"nothing to resume: no {CHECKPOINT} in {str(run_dir)!r}")
        start, tensors = read_checkpoint(ckpt)
        with torch.no_grad():
            for k, p in ensemble.params.items():
                p.copy_(tensors[f"param.{k}"])
        restore_optimizer(optimizer, ensemble.params, tensors)
        result.metrics[:start] = tensors["metrics"][:start]
        result.snapshots = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("snap.")}
        for row in tensors.get("reactive", torch.zeros(0, 4)).tolist():  # replay the controllers' decisions
            d = Decision(timeline.names[int(row[0])], int(row[1]), row[2], int(row[3]))
            apply(timeline, d)
            result.decisions.append(d)

    def checkpoint(step_done: int) -> None:
        if ckpt is None:
            return
        extra = {"metrics": result.metrics[:step_done]}
        if result.decisions:
            extra["reactive"] = torch.tensor([[col[d.param], d.at, d.value, d.until] for d in result.decisions], dtype=torch.float64)
        extra.update({f"snap.{s}": z for s, z in result.snapshots.items()})
        save_checkpoint(ckpt, step_done, ensemble.params, optimizer, extra)

    def snapshot(step: int) -> None:
        result.snapshots[step] = ensemble.capture_at(SNAPSHOT_SITE, snap_x)

    def member_loss(out, acts, x, labels):
        recon = (out - x).pow(2).mean()
        values = torch.stack([t(acts, labels) for t in objective.terms]) if objective.terms else out.new_zeros(0)
        return recon, values

    # the same loss on all members at once: terms take (..., N, D), so they need no vmap
    fast = ensemble.fast_path(objective.sites) if cfg.train.fast else None
    result.fast = fast is not None

    def ensemble_loss(x, labels):
        if fast is None:
            return ensemble.run(member_loss, cap, x, labels)
        out, acts = fast(ensemble.params, x)
        recon = (out - x).pow(2).mean((-2, -1))
        values = torch.stack([t(acts, labels) for t in objective.terms], -1) if objective.terms else out.new_zeros(len(out), 0)
        return recon, values

    every = cfg.train.snapshot_every
    callbacks = list(callbacks)
    with Capture(ensemble.template, objective.sites) as cap, _StopFlag() as stop, flush_denormals():
        if start == 0 and every:
            snapshot(0)
        for step in range(start, steps):
            if extent_col is not None and float(table[step, extent_col]) != last_extent:
                last_extent = float(table[step, extent_col])
                sampler.set_weights(weights * curriculum_weights(depth, last_extent))
            u = stream(step)
            idx = sampler.indices(u[..., 0])
            x = points[idx]
            labels = {n: (u[..., 1 + i] < probs[i][idx]).float() for i, n in enumerate(names)}
            row = table[step]
            if steered:  # live values for columns a controller may have re-targeted
                row = row.clone()
                for c, name in steered:
                    row[c] = timeline.tracks[name](step)
            for group in optimizer.param_groups:
                group["lr"] = float(row[lr_col])
            w = row[term_cols].float()
            optimizer.zero_grad(set_to_none=True)
            recon, values = ensemble_loss(x, labels)
            total = recon + (values @ w if masks is None else (values * (masks * w)).sum(-1))
            total.sum().backward()
            optimizer.step()
            result.metrics[step] = torch.cat([total.detach()[:, None], recon.detach()[:, None], values.detach()], dim=1)
            result.steps_done = step + 1
            # controllers decide before any checkpoint, so a resumed run replays the same decisions
            for c in controllers:
                window = result.metrics[max(0, step + 1 - c.every): step + 1, :, metric_names.index(c.metric)]
                d = c.decide(step + 1, window, timeline)
                if d is not None:
                    apply(timeline, d)
                    result.decisions.append(d)
            actions = timeline.actions_at(step)
            if (every and (step + 1) % every == 0) or "snapshot" in actions or step + 1 == steps:
                snapshot(step + 1)
            if (step + 1) % cfg.train.checkpoint_every == 0 or "checkpoint" in actions:
                checkpoint(step + 1)
            if progress is not None:
                progress(step + 1, steps)
            for cb in callbacks:
                cb(step, result)
            if stop.set:
                checkpoint(step + 1)
                raise TrainingInterrupted(step + 1, run_dir)
    checkpoint(steps)
    return result


def metrics_table(result: TrainResult) -> np.ndarray:
    """Long format rows: step, seed, lr, one column per schedule weight, then each metric."""
    steps, n_seeds, _ = result.metrics.shape
    sched = result.timeline.table()
    rows = []
    for i, seed in enumerate(result.seeds):
        block = np.column_stack([np.arange(steps), np.full(steps, seed), sched, result.metrics[:, i].numpy()])
        rows.append(block)
    return np.concatenate(rows)[: steps * n_seeds]
