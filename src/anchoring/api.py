"""The experiment API the CLI calls: run or resume, evaluate, write the run directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from anchoring import runs
from anchoring.config import ExperimentConfig, load_config
from anchoring.domains.colour import rgb_grid
from anchoring.errors import AnchoringError
from anchoring.evaluate.colour import summarize_seeds
from anchoring.report import figures, html
from anchoring.train import TrainResult, train
from anchoring.train.objective import build_objective, build_timeline
from anchoring.train.loop import CHECKPOINT

Progress = Callable[[int, int], None]


@dataclass
class Outcome:
    path: Path
    summary: dict[str, Any]


def validate(cfg: ExperimentConfig) -> None:
    """Everything that can be checked without training, so bad input writes nothing."""
    build_timeline(cfg, build_objective(cfg))
    for c in cfg.concepts:
        for d in c.dims or []:
            if not 0 <= d < cfg.model.latent_dim:
                raise AnchoringError(f"concept {c.name!r}: dim {d} is outside 0..{cfg.model.latent_dim - 1}")


def run(cfg: ExperimentConfig, out: Path | None = None, *, progress: Progress | None = None) -> Outcome:
    validate(cfg)
    path = runs.new_run_dir(cfg, out)
    path.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(path / runs.CONFIG, cfg.to_toml())
    runs.write_atomic(path / runs.ARCH, json.dumps(runs.architecture(cfg), indent=2))
    return _train_and_finish(cfg, path, resume=False, progress=progress)


def resume(path: Path, *, progress: Progress | None = None) -> Outcome:
    if not (path / runs.CONFIG).is_file():
        raise AnchoringError(f"{str(path)!r} is not a run directory (no {runs.CONFIG})")
    if not (path / CHECKPOINT).is_file():
        raise AnchoringError(f"{str(path)!r} has no checkpoint to resume from")
    cfg = load_config(path / runs.CONFIG)
    return _train_and_finish(cfg, path, resume=True, progress=progress)


def _train_and_finish(cfg: ExperimentConfig, path: Path, *, resume: bool, progress: Progress | None) -> Outcome:
    t0 = time.perf_counter()
    result = train(cfg, path, resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    summary = finish(result, path)
    summary["timing"] = {"train_s": round(train_s, 3), "total_s": round(time.perf_counter() - t0, 3)}
    runs.write_atomic(path / runs.SUMMARY, json.dumps(summary, indent=2))
    return Outcome(path, summary)


def finish(result: TrainResult, path: Path) -> dict[str, Any]:
    """Metrics, snapshots, evaluation, figures and report for a trained ensemble."""
    from safetensors.torch import save as st_save

    cfg = result.config
    header = ["step", "seed", *result.timeline.names, *result.metric_names]
    from anchoring.train.loop import metrics_table

    runs.write_metrics_csv(path / runs.METRICS, header, metrics_table(result))
    runs.write_atomic(path / runs.SNAPSHOTS, st_save({"points": result.snapshot_points,
                                                      **{f"step.{s}": z for s, z in sorted(result.snapshots.items())}}))
    models = result.ensemble.members()
    with torch.no_grad():
        encode = lambda x: torch.stack([m.encode(x) for m in models])  # noqa: E731
        recon = lambda x: torch.stack([m(x) for m in models])  # noqa: E731
        rows = summarize_seeds(encode, recon, cfg, result.objective, rgb_grid(cfg.data.validation_levels))
        slice_points = rgb_grid(8)
        z = encode(slice_points)
    anchor = next((torch.tensor(c.anchor) for c in result.objective.concepts
                   if c.name == cfg.evaluate.concept and c.anchor is not None), None)
    figdir = path / "figures"
    figures.save(figures.latent_slices(z, slice_points, result.seeds, anchor), figdir / "latent_slices.png")
    figures.save(figures.loss_curves(result.metrics, result.metric_names, result.seeds), figdir / "loss_curves.png")
    figures.save(figures.schedule_plot(result.timeline), figdir / "schedule.png")

    anchored = [r for r in rows if r.get("anchored")]
    summary: dict[str, Any] = {
        "experiment": cfg.name, "upstream": cfg.upstream, "steps": result.timeline.steps,
        "seeds": rows, "anchored_seeds": len(anchored) if rows and "anchored" in rows[0] else None,
        "criterion": f"12 hues in order around dims {tuple(cfg.evaluate.hue_dims)} and cos({cfg.evaluate.concept}, anchor) ≥ {cfg.evaluate.min_cosine}",
    }
    write_report(path, cfg, rows, summary)
    return summary


def seed_table(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    keys = [k for k in ("seed", "anchor_cos", "hue_order", "val_mse", "val_anchor_loss", "anchored") if rows and k in rows[0]]
    return keys, [[r[k] for k in keys] for r in rows]


def write_report(path: Path, cfg: ExperimentConfig, rows: list[dict], summary: dict[str, Any]) -> None:
    header, body = seed_table(rows)
    figs = path / "figures"
    verdict = (f"<p><b>{summary['anchored_seeds']} of {len(rows)} seeds anchored</b> ({summary['criterion']}).</p>"
               if summary.get("anchored_seeds") is not None else "")
    sections = [
        ("Overview", f"<p>{cfg.description}</p><p>upstream experiment: {cfg.upstream or '–'}; steps: {summary['steps']}; "
                     f"seeds: {cfg.train.seed}…{cfg.train.seed + cfg.train.seeds - 1}</p>{verdict}"),
        ("Per-seed results", html.table_html(header, body)),
        ("Latent space (axis-aligned slices; × marks the anchor)", html.image_html(figs / "latent_slices.png", "latent slices")),
        ("Loss curves", html.image_html(figs / "loss_curves.png", "loss curves")),
        ("Schedule", html.image_html(figs / "schedule.png", "schedule")),
        ("Resolved config", f"<pre>{html.html.escape(cfg.to_toml())}</pre>"),
    ]
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
