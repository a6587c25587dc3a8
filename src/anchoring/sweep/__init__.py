"""Sweeps: an experiment's seeds (and a grid of settings) split into shards over processes.

A shard is one grid point × a contiguous block of seeds, trained in its own process with one
thread; what it trains and how a point's shards are put together is the experiment kind's
(`Kind.seed_blocks`, `train_shard`, `merge_shards`; colour: one ensemble per shard, whose
checkpoints are concatenated along the seed axis; lm: every (arm, seed) job of the block, whose
per-job checkpoints are gathered into the point's `arms/`). Shards are independent and
deterministic, so the local backend can retry a shard whose process died (it resumes from the
shard's last checkpoints) and the Ray backend can let Ray retry it; nothing is trained twice
into the result. When every shard of a grid point is done, they are merged into one run
directory, which is then evaluated and reported exactly like `anchoring run` output: the same
numbers an unsharded run gives, to floating-point tolerance.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from anchoring import experiments, lifecycle, runs
from anchoring.config import ExperimentBase
from anchoring.errors import AnchoringError
from anchoring.kinds import REGISTRY, kind_of
from anchoring.report import html
from anchoring.resources import check_fits
from anchoring.sweep.layout import DIVERGED, DONE, SHARD_CONFIG

SWEEP_PLAN = "sweep.json"  # how the sweep was planned: experiment, --set items, grid, workers

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
        vals = [v.strip() for v in values.split(",")]
        if not key.strip() or not any(vals):
            raise AnchoringError(f"--grid {item!r}: expected key=v1,v2,…")
        if not all(vals):
            raise AnchoringError(f"--grid {item!r}: an empty value between commas (each value is one grid point)")
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
    folders: dict[str, list[str]] = {}
    for extra in points if grid else []:  # two points in one folder: one would overwrite the other's run
        twin = folders.setdefault(point_name(extra), extra)
        if twin is not extra:
            raise AnchoringError(f"--grid points {', '.join(twin)} and {', '.join(extra)} would share the folder "
                                 f"points/{point_name(extra)} (folder names keep letters, digits and _.,=+- only); "
                                 f"give values that differ there")
    seen: dict[str, list[str]] = {}
    for i, extra in enumerate(points):
        try:
            cfg = experiments.load(experiment, [*sets, *extra])
        except AnchoringError as e:  # --set items alone were loaded already, so the point is at fault
            raise AnchoringError(f"--grid point {', '.join(extra)}: {str(e).replace('--set key', 'key')}") from None
        twin = seen.setdefault(cfg.to_toml(), extra)
        if twin is not extra:
            raise AnchoringError(f"--grid points {', '.join(twin)} and {', '.join(extra)} give the same config; "
                                 f"each grid point must be distinct")
        kind = kind_of(cfg)
        if "sweep" not in kind.studies or getattr(cfg, "study", None):
            what = f"a {cfg.study!r} study" if getattr(cfg, "study", None) else f"a {cfg.kind!r} experiment"
            able = ", ".join(k.name for k in REGISTRY.values() if "sweep" in k.studies)
            raise AnchoringError(f"{cfg.name!r} is {what}; sweeps shard the seeds of plain runs of these kinds only: {able}")
        if cfg.train.seed_list is not None:
            raise AnchoringError("sweeps set the seeds themselves; remove train.seed_list")
        try:
            lifecycle.validate(cfg)
        except AnchoringError as e:
            raise AnchoringError(f"--grid point {', '.join(extra)}: {e}" if grid else str(e)) from None
        configs.append(cfg)
        for block in kind.seed_blocks(cfg, -(-workers // len(points))):
            shard_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed_list": block})})
            shards.append(Shard(i, block, shard_cfg, root / "shards" / f"p{i:03d}-s{block[0]}-{block[-1]}"))
    return configs, shards


def to_train(shards: list[Shard]) -> list[Shard]:
    """The shards left to train: not finished, and not of a grid point where a shard diverged (a
    retry would meet the same step again, and the point cannot be merged without it)."""
    lost = {s.point for s in shards if (s.dir / DIVERGED).is_file()}
    return [s for s in shards if not (s.dir / DONE).is_file() and s.point not in lost]


def check_memory(shards: list[Shard], workers: int) -> None:
    """Each shard process checks only itself, so add up the largest shards that this machine's
    workers will train side by side (finished ones, of a continued sweep, train nothing)."""
    todo = to_train(shards)
    busy = sorted((kind_of(s.config).shard_memory(s.config) for s in todo), reverse=True)[:workers]
    check_fits(sum(busy), f"{min(workers, len(todo))} shards training at once", "give --workers a smaller number")


def check_continuation(out: Path, shards: list[Shard], plan_record: dict) -> dict:
    """Continuing a sweep reuses its shards only when they were planned from the very same
    resolved config; anything else would mix old weights under new settings, so it is refused.
    `sweep.json` records how the sweep was planned, so the refusal can say what changed; returns
    that record (empty for a new sweep)."""
    root = out / "shards"
    if not root.is_dir():
        return {}
    old_plan = runs.read_json(out / SWEEP_PLAN) if (out / SWEEP_PLAN).is_file() else {}
    if old_plan and bool(old_plan.get("grid")) != bool(plan_record["grid"]):  # the root would mix a run with a grid's report
        has = "a grid" if old_plan.get("grid") else "no grid"
        raise AnchoringError(f"{str(out)!r} holds a sweep with {has}: continue it with the same command, or choose another --out")
    planned = {s.dir.name: s for s in shards}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        s = planned.get(d.name)
        old = d / SHARD_CONFIG
        if s is None or (old.is_file() and old.read_text() != s.config.to_toml()):
            changed = [f"{what} {old_plan.get(key)} (now {plan_record[key]})" for key, what in
                       (("experiment", "experiment"), ("sets", "--set/--seeds/--steps"), ("grid", "--grid"))
                       if old_plan and _same(old_plan.get(key)) != _same(plan_record[key])]
            if not changed and old_plan and old_plan.get("workers") != plan_record["workers"]:
                raise AnchoringError(f"{str(out)!r} is a sweep started with --workers {old_plan.get('workers')}, which set "
                                     f"its shards' seed blocks: continue it with --workers {old_plan.get('workers')}")
            said = f"it was started with {'; '.join(changed)}" if changed else f"shard {d.name} differs"
            raise AnchoringError(f"{str(out)!r} holds a sweep with other settings ({said}); "
                                 f"continue it with the same command, or choose another --out")
    return old_plan


def _same(value: object) -> object:
    """A plan entry as compared for "what changed": `--set` items without the spaces around `=`."""
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return [f"{_key(v.split('=', 1)[0])}={v.split('=', 1)[1].strip()}" for v in value]
    return value


def _key(key: str) -> str:
    """A dotted config key as the overrides read it (`terms.00.power` is `terms.0.power`)."""
    return ".".join(str(int(p)) if p.strip().isdigit() else p.strip() for p in key.strip().split("."))


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
    given = {_key(item.split("=", 1)[0]): item for item in sets or []}
    for key, _values in grid:  # the grid's values would silently replace it (or a part of it) in every point
        a = _key(key)
        for b, item in given.items():
            if a == b or a.startswith(b + ".") or b.startswith(a + "."):
                raise AnchoringError(f"--grid {key} is also given as {item!r} (by --set, --seed, --seeds or --steps); "
                                     f"drop one")
    configs, shards = plan(experiment, sets or [], grid, workers, out)
    spec = experiments.find(experiment)  # a continuation types a built-in as named, a file by its absolute path
    typed = experiment if spec.parent == experiments.HERE else str(spec.resolve())
    record = {"experiment": configs[0].name, "sets": list(sets or []), "grid": [[k, v] for k, v in grid], "workers": workers,
              "source": typed, "backend": backend, "address": address}
    old_plan = check_continuation(out, shards, record)
    if shards and not to_train(shards) and _finished(out, grid):
        where = f"its report is {str(out / runs.REPORT)!r}" if grid else f"`anchoring show {out}` prints it"
        raise AnchoringError(f"{str(out)!r} is a finished sweep ({where}); choose another --out to run it again")
    record["workers"] = old_plan.get("workers", workers)  # what set the seed blocks, which a continuation keeps
    if backend == "local" or (backend == "ray" and not address):  # a Ray cluster trains on its own machines
        check_memory(shards, workers)
    runs.check_writable(out)
    for s in shards:
        s.dir.mkdir(parents=True, exist_ok=True)
        runs.write_atomic(s.dir / SHARD_CONFIG, s.config.to_toml())
    runs.write_json(out / SWEEP_PLAN, record)  # after the shards: a folder holding only this is no sweep to continue
    if backend == "local":
        from anchoring.sweep.backends import run_local

        run_local(shards, workers, retries, progress, keep_going=len(configs) > 1)
    elif backend == "ray":
        from anchoring.sweep.backends import run_ray

        run_ray(shards, workers, address, retries, progress, keep_going=len(configs) > 1)
    else:
        raise AnchoringError(f"unknown backend {backend!r} (local, ray)")
    train_s = time.perf_counter() - t0
    points = grid_points(grid)
    results, lost = [], []
    if grid:  # a continued sweep re-evaluates every point: an interruption must not leave the old report looking finished
        for name in (runs.SUMMARY, runs.REPORT):
            (out / name).unlink(missing_ok=True)
    for i, (cfg, extra) in enumerate(zip(configs, points)):
        diverged = [s for s in shards if s.point == i and (s.dir / DIVERGED).is_file()]
        if diverged:  # nothing to merge: the point is named in the report and the command fails after it
            lost.append({"point": ", ".join(extra), "shard": diverged[0].name,
                         "message": (diverged[0].dir / DIVERGED).read_text().strip()})
            continue
        path = out if not grid else out / "points" / point_name(extra)
        path.mkdir(parents=True, exist_ok=True)
        lifecycle.write_config(path, cfg)  # with its digest, which `anchoring resume` checks like any run's
        (path / runs.SUMMARY).unlink(missing_ok=True)  # a continued sweep re-evaluates its merged run
        kind_of(cfg).merge_shards(cfg, [s.dir for s in shards if s.point == i], path)
        outcome = lifecycle.finish_merged(path)  # every model at its last step: evaluates, draws and reports, trains nothing
        results.append((extra, outcome))
    if not results:
        raise AnchoringError("every grid point diverged: " + "; ".join(f"{d['point']}: {d['message']}" for d in lost))
    summary = _sweep_summary(configs[0].name, grid, shards, results, workers, backend, train_s, time.perf_counter() - t0,
                             planned_workers=record["workers"], continued=bool(old_plan))
    if lost:
        summary["diverged"] = lost
    if grid:
        _write_grid_report(out, summary, results)
    else:
        merged = runs.read_json(out / runs.SUMMARY)
        merged["sweep"] = summary["sweep"]
        merged["timing"] = {**merged.get("timing", {}), **summary["timing"]}  # keep the run's own entries (per-arm train times)
        runs.write_json(out / runs.SUMMARY, merged)
        summary = merged
    return summary


def _finished(out: Path, grid: list) -> bool:
    """Whether the sweep at `out` wrote its last file. A grid sweep writes its summary last; without a
    grid the merged run's summary comes first and the sweep's record is added to it after, so a
    summary without that record is a sweep stopped in between, which the same command completes."""
    if not (out / runs.SUMMARY).is_file():
        return False
    if grid:
        return True
    try:
        return "sweep" in runs.read_json(out / runs.SUMMARY)
    except (AnchoringError, TypeError):
        return False


def _point_row(extra: list[str], s: dict) -> dict:
    return {"point": ", ".join(extra) or "–", **REGISTRY[s.get("kind", "colour")].sweep_row(s)}


def _sweep_summary(experiment: str, grid, shards: list[Shard], results, workers: int, backend: str,
                   train_s: float, total_s: float, *, planned_workers: int, continued: bool) -> dict:
    """The sweep's record. `workers` and the timing are this invocation's; a continued sweep says so,
    and names the --workers it was planned with (which set its seed blocks), since the two may differ."""
    points = [_point_row(extra, o.summary) for extra, o in results]
    keys = list(dict.fromkeys(k for p in points for k in p))  # points may differ (e.g. one has unlearning rows)
    return {
        "experiment": experiment, "grid": [{"key": k, "values": v} for k, v in grid],
        "points": [{k: p.get(k) for k in keys} | {"path": str(o.path.resolve())} for p, (_, o) in zip(points, results)],
        "sweep": {"backend": backend, "workers": workers, "planned_workers": planned_workers, "continued": continued,
                  "shards": [{"name": s.name, "seeds": s.seeds} for s in shards]},
        "timing": {"train_s": round(train_s, 3), "total_s": round(total_s, 3)},
    }


def _write_grid_report(out: Path, summary: dict, results) -> None:
    header = [k for k in summary["points"][0] if k != "path"]
    rows = [[p[k] for k in header] for p in summary["points"]]
    sections = [("Overview", f"<p>Sweep of {summary['experiment']} over "
                             f"{' × '.join(g['key'] + ' ∈ {' + ', '.join(g['values']) + '}' for g in summary['grid'])}; "
                             f"{len(summary['sweep']['shards'])} shards on {summary['sweep']['workers']} "
                             f"{summary['sweep']['backend']} worker(s); {summary['timing']['total_s']:.1f} s"
                             f"{' (this invocation: the sweep was continued)' if summary['sweep']['continued'] else ''}"
                             f".</p>"),
                ("Per grid point", html.table_html(header, rows))]
    if summary.get("diverged"):
        sections.append(("Diverged points", "<p>Training diverged in these grid points, so they have no results above "
                          "(a divergence is deterministic: continuing the sweep would meet it again).</p>"
                          + html.table_html(["point", "shard", "message"],
                                            [[d["point"], d["shard"], d["message"]] for d in summary["diverged"]])))
    kind = REGISTRY[results[0][1].summary.get("kind", "colour")]
    for caption, fig_path in kind.grid_figures(out, results):
        sections.append((caption, html.image_html(fig_path, caption)))
    for extra, o in results:
        figure = REGISTRY[o.summary.get("kind", "colour")].sweep_figure
        if figure is None or not (o.path / figure[0]).is_file():
            continue
        report = f"{o.path.relative_to(out).as_posix()}/report.html"
        sections.append((f"{', '.join(extra)}: {figure[1]}", html.image_html(o.path / figure[0], figure[1])
                         + f"<p>full report: {html.link_html(report, report)}</p>"))
    runs.write_atomic(out / runs.REPORT, html.page(f"anchoring sweep: {summary['experiment']}", sections))
    runs.write_json(out / runs.SUMMARY, summary)
