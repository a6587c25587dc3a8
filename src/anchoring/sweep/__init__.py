"""Sweeps: an experiment's seeds (and a grid of settings) split into shards over processes.

A shard is one grid point × a contiguous block of seeds, trained as one ensemble in its own
process with one thread. Shards are independent and deterministic, so the local backend can
retry a shard whose process died (it resumes from the shard's last checkpoint) and the Ray
backend can let Ray retry it; nothing is trained twice into the result. When every shard of
a grid point is done, their checkpoints are concatenated along the seed axis into one run
directory, which is then evaluated and reported exactly like `anchoring run` output: the same
numbers an unsharded run gives, to floating-point tolerance.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from anchoring import experiments, lifecycle, runs
from anchoring.config import ExperimentBase
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import median
from anchoring.kinds import kind_of
from anchoring.report import html
from anchoring.sweep.worker import SHARD_CONFIG
from anchoring.train.checkpoint import CHECKPOINT, FORMAT, atomic_save, read_checkpoint

Progress = Callable[[int, int], None]


@dataclass
class Shard:
    point: int  # index into the grid points
    seeds: list[int]
    config: ExperimentBase
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2` → (key, [v1, v2]); keys are config paths as for --set."""
    grid = []
    for item in items:
        if "=" not in item:
            raise AnchoringError(f"--grid {item!r}: expected key=v1,v2,…")
        key, values = item.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not vals:
            raise AnchoringError(f"--grid {item!r}: expected key=v1,v2,…")
        if key.strip() in (k for k, _ in grid):
            raise AnchoringError(f"--grid key {key.strip()!r} given twice")
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise AnchoringError(f"--grid {key.strip()}: value(s) {', '.join(dup)} given twice (each grid point must be distinct)")
        grid.append((key.strip(), vals))
    return grid


def grid_points(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination, as lists of `key=value` overrides (one empty point without a grid)."""
    points: list[list[str]] = [[]]
    for key, vals in grid:
        points = [p + [f"{key}={v}"] for p in points for v in vals]
    return points


def point_name(overrides: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", ",".join(overrides)) or "all"


def plan(experiment: str, sets: list[str], grid: list[tuple[str, list[str]]], workers: int,
         root: Path) -> tuple[list[ExperimentBase], list[Shard]]:
    """Configs per grid point and the shards that train them (validated before anything runs)."""
    configs, shards = [], []
    points = grid_points(grid)
    for i, extra in enumerate(points):
        cfg = experiments.load(experiment, [*sets, *extra])
        if "sweep" not in kind_of(cfg).studies or getattr(cfg, "study", None):
            what = f"a {cfg.study!r} study" if getattr(cfg, "study", None) else f"a {cfg.kind!r} experiment"
            raise AnchoringError(f"{cfg.name!r} is {what}; sweeps shard the seeds of plain colour runs only")
        if cfg.train.seed_list is not None or cfg.train.term_masks is not None:
            raise AnchoringError("sweeps set the seeds themselves; remove train.seed_list / train.term_masks")
        lifecycle.validate(cfg)
        configs.append(cfg)
        seeds = cfg.train.member_seeds()
        # reactive controllers decide from metrics of the whole ensemble: such a run cannot be split by seed
        n_blocks = 1 if cfg.reactive else max(1, min(len(seeds), math.ceil(workers / len(points))))
        size = math.ceil(len(seeds) / n_blocks)
        for b in range(0, len(seeds), size):
            block = seeds[b:b + size]
            shard_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed_list": block})})
            shards.append(Shard(i, block, shard_cfg, root / "shards" / f"p{i:03d}-s{block[0]}-{block[-1]}"))
    return configs, shards


def check_continuation(out: Path, shards: list[Shard]) -> None:
    """Continuing a sweep reuses its shards only when they were planned from the very same
    resolved config; anything else would mix old weights under new settings, so it is refused."""
    root = out / "shards"
    if not root.is_dir():
        return
    planned = {s.dir.name: s for s in shards}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        s = planned.get(d.name)
        old = d / SHARD_CONFIG
        if s is None or (old.is_file() and old.read_text() != s.config.to_toml()):
            raise AnchoringError(f"{str(out)!r} holds a sweep with other settings (shard {d.name} differs); "
                                 f"continue it with the same command, or choose another --out")


def merge_checkpoints(paths: list[Path], out: Path) -> None:
    """Concatenate shard checkpoints along the member axis (in the order given)."""
    loaded = [read_checkpoint(p) for p in paths]
    steps = {s for s, _ in loaded}
    if len(steps) != 1:
        raise AnchoringError(f"shards stopped at different steps {sorted(steps)}")
    parts = [t for _, t in loaded]
    merged: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        if key == "metrics":
            merged[key] = torch.cat(vals, dim=1)  # (steps, members, metrics)
        elif key.endswith(".step"):
            merged[key] = vals[0]  # Adam's step count is shared by all members
        else:
            merged[key] = torch.cat(vals, dim=0)  # params, Adam moments, snapshots: (members, ...)
    atomic_save(merged, out, {"format": FORMAT, "step": str(steps.pop())})


def sweep(experiment: str, out: Path, *, sets: list[str] | None = None, grid: list[tuple[str, list[str]]] | None = None,
          workers: int = 1, backend: str = "local", address: str | None = None, retries: int = 2,
          progress: Progress | None = None) -> dict:
    """Run every shard, merge each grid point into a run directory, and write the sweep report."""
    t0 = time.perf_counter()
    grid = grid or []
    if workers < 1:
        raise AnchoringError(f"--workers must be ≥ 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise AnchoringError(f"{str(out)!r} is a file, not a sweep directory (choose another --out)")
    if out.exists() and any(out.iterdir()) and not (out / "shards").is_dir():
        raise AnchoringError(f"{str(out)!r} already exists and is not a sweep to continue")
    configs, shards = plan(experiment, sets or [], grid, workers, out)
    check_continuation(out, shards)
    runs.check_writable(out)
    for s in shards:
        s.dir.mkdir(parents=True, exist_ok=True)
        runs.write_atomic(s.dir / SHARD_CONFIG, s.config.to_toml())
    if backend == "local":
        from anchoring.sweep.backends import run_local

        run_local(shards, workers, retries, progress)
    elif backend == "ray":
        from anchoring.sweep.backends import run_ray

        run_ray(shards, workers, address, retries, progress)
    else:
        raise AnchoringError(f"unknown backend {backend!r} (local, ray)")
    train_s = time.perf_counter() - t0
    points = grid_points(grid)
    results = []
    for i, (cfg, extra) in enumerate(zip(configs, points)):
        path = out if not grid else out / "points" / point_name(extra)
        path.mkdir(parents=True, exist_ok=True)
        runs.write_atomic(path / runs.CONFIG, cfg.to_toml())
        (path / runs.SUMMARY).unlink(missing_ok=True)  # a continued sweep re-evaluates its merged run
        merge_checkpoints([s.dir / CHECKPOINT for s in shards if s.point == i], path / CHECKPOINT)
        outcome = lifecycle.finish_merged(path)  # at the last step: evaluates, draws and reports, trains nothing
        results.append((extra, outcome))
    summary = _sweep_summary(experiment, grid, shards, results, workers, backend, train_s, time.perf_counter() - t0)
    if grid:
        _write_grid_report(out, summary, results)
    else:
        merged = runs.read_json(out / runs.SUMMARY)
        merged["sweep"] = summary["sweep"]
        merged["timing"] = summary["timing"]
        runs.write_json(out / runs.SUMMARY, merged)
        summary = merged
    return summary


def _point_row(extra: list[str], s: dict) -> dict:
    rows = s["seeds"]
    row = {"point": ", ".join(extra) or "–", "seeds": len(rows), "anchored": s.get("anchored_seeds")}
    if rows and "anchor_cos" in rows[0]:
        row["anchor_cos_median"] = median(r["anchor_cos"] for r in rows)
    if rows:
        row["val_mse_median"] = median(r["val_mse"] for r in rows)
    return row


def _sweep_summary(experiment: str, grid, shards: list[Shard], results, workers: int, backend: str,
                   train_s: float, total_s: float) -> dict:
    return {
        "experiment": experiment, "grid": [{"key": k, "values": v} for k, v in grid],
        "points": [_point_row(extra, o.summary) | {"path": str(o.path)} for extra, o in results],
        "sweep": {"backend": backend, "workers": workers, "shards": [{"name": s.name, "seeds": s.seeds} for s in shards]},
        "timing": {"train_s": round(train_s, 3), "total_s": round(total_s, 3)},
    }


def _write_grid_report(out: Path, summary: dict, results) -> None:
    header = [k for k in summary["points"][0] if k != "path"]
    rows = [[p[k] for k in header] for p in summary["points"]]
    sections = [("Overview", f"<p>Sweep of {summary['experiment']} over "
                             f"{' × '.join(g['key'] + ' ∈ {' + ', '.join(g['values']) + '}' for g in summary['grid'])}; "
                             f"{len(summary['sweep']['shards'])} shards on {summary['sweep']['workers']} "
                             f"{summary['sweep']['backend']} worker(s); {summary['timing']['total_s']:.1f} s.</p>"),
                ("Per grid point", html.table_html(header, rows))]
    for extra, o in results:
        sections.append((f"{', '.join(extra)}: latent slices (full report: {o.path.relative_to(out)}/report.html)",
                         html.image_html(o.path / "figures" / "latent_slices.png", "latent slices")))
    runs.write_atomic(out / runs.REPORT, html.page(f"anchoring sweep: {summary['experiment']}", sections))
    runs.write_json(out / runs.SUMMARY, summary)
