"""`sweep`: seeds and a grid of settings split over worker processes or Ray, merged into one report."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from anchoring import experiments, lifecycle, runs, runtime
from anchoring.cli.common import app, fail, load_experiment, out, print_outcome, progress_bar, stopped
from anchoring.cli.show import diverged_points, sweep_table
from anchoring.errors import AnchoringError
from anchoring.train import TrainingInterrupted
from anchoring.train.workers import sigterm_interrupts


@app.command("sweep")
def sweep_cmd(
    experiment: str = typer.Argument(experiments.DEFAULT, help="built-in name, ex-<number> alias, or a config .toml"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds per grid point"),
    seed: Optional[int] = typer.Option(None, "--seed", help="first seed"),
    steps: Optional[int] = typer.Option(None, "--steps", help="run length; the schedule is stretched to fit"),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key for every point"),
    grid: list[str] = typer.Option([], "--grid", metavar="KEY=V1,V2", help="one grid axis (repeat for more axes)"),
    workers: int = typer.Option(os.cpu_count() or 1, "--workers", help="parallel shards (default: one per core, one thread each)"),
    backend: str = typer.Option("local", "--backend", help="local (worker processes) or ray"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="sweep directory (default runs/<experiment>-sweep/<time>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Split seeds (and a grid of settings) over processes or Ray; merge into one run and report."""
    from anchoring import sweep

    if workers < 1:
        fail(f"--workers must be ≥ 1, got {workers}")
    if backend not in ("local", "ray"):
        fail(f"--backend must be local or ray, got {backend!r}")
    if address and backend != "ray":
        fail("--address is for --backend ray")

    if runtime.launched_by_torchrun():  # every torchrun worker would run the whole sweep into the same folder
        fail("a sweep starts its own worker processes: run `anchoring sweep` without torchrun (--workers N sets how many)")
    t0 = time.perf_counter()
    path = None
    try:
        axes = sweep.parse_grid(grid)
        cfg, overrides = load_experiment(experiment, sets, seeds, seed, steps)
        name = cfg.name
        path = out_dir or runs.new_run_dir(f"{name}-sweep", None)  # created: a sweep started in the same second gets another
        with sigterm_interrupts(), progress_bar(f"{name} shards", not quiet and sys.stderr.isatty()) as update:
            summary = sweep.sweep(experiment, path, sets=overrides, grid=axes, workers=workers, backend=backend,
                                  address=address, progress=update)
    except AnchoringError as e:
        _drop_if_empty(path if out_dir is None else None)
        fail(str(e))
    except (KeyboardInterrupt, TrainingInterrupted):  # the workers have saved and stopped (backends.run_local)
        _drop_if_empty(path if out_dir is None else None)
        if path is not None and (path / "shards").is_dir():
            kept = "finished shards and checkpoints are kept" if backend == "local" else "finished shards are kept"
            line = f"sweep interrupted; {kept} — continue with the same command and --out {path}"
        else:
            line = "sweep interrupted before any shard was written; nothing to continue"
        stopped(line)
    if axes:
        out.print(sweep_table(summary["points"], f"sweep of {name}: medians over seeds per grid point"))  # as `show` prints it
        out.print(f"wall time {time.perf_counter() - t0:.1f} s", markup=False)
        out.print(f"report: {path / 'report.html'}", markup=False)
        if summary.get("diverged"):  # the healthy points are reported above; the command still fails
            fail(diverged_points(summary["diverged"]))
    else:
        print_outcome(lifecycle.Outcome(path, summary), time.perf_counter() - t0)


def _drop_if_empty(path: Path | None) -> None:
    """The generated folder runs/<name>-sweep/<time> of a sweep refused or stopped before it wrote
    anything, and its parents if that leaves them empty: bad input writes nothing."""
    for p in (path, path.parent, path.parent.parent) if path is not None else ():
        try:
            p.rmdir()
        except OSError:
            return
