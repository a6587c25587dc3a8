"""`anchoring` command: parse, call the experiment API, print tables and paths.

Every user mistake ends as one line `error: …` on stderr with exit code 2, and nothing written.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from anchoring import api, experiments
from anchoring.errors import AnchoringError
from anchoring.train import TrainingInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Sparse concept anchoring: train, inspect, steer and delete concepts.")
out = Console(soft_wrap=True)  # one-line outputs stay one line (paths, list rows)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield None
        return
    cols = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)
        last = [0.0]

        def update(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] > 0.1 or done == total:  # redraw ≤10×/s: the step itself is ~ms
                bar.update(task, completed=done, total=total)
                last[0] = now

        yield update


def print_outcome(outcome: api.Outcome, wall: float) -> None:
    rows = outcome.summary["seeds"]
    header, body = api.seed_table(rows)
    table = Table(title=f"{outcome.summary['experiment']}: per-seed results")
    for h in header:
        table.add_column(h, justify="right")
    for r in body:
        table.add_row(*[("yes" if v else "NO") if isinstance(v, bool) else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r])
    out.print(table)
    n = outcome.summary.get("anchored_seeds")
    if n is not None:
        out.print(f"{n}/{len(rows)} seeds anchored ({outcome.summary['criterion']})", markup=False)
    out.print(f"wall time {wall:.1f} s", markup=False)
    out.print(f"report: {outcome.path / 'report.html'}", markup=False, soft_wrap=True)


@app.command("list")
def list_cmd() -> None:
    """Built-in experiments, one line each (upstream number in brackets)."""
    for spec in experiments.builtin().values():
        tag = f"[{spec.upstream}]" if spec.upstream else ""
        default = " (default)" if spec.name == experiments.DEFAULT else ""
        out.print(f"{spec.name:<22} {tag:<9} {spec.description}{default}", markup=False, highlight=False)


@app.command("run")
def run_cmd(
    experiment: str = typer.Argument(experiments.DEFAULT, help="built-in name, ex-<number> alias, or a config .toml / run directory"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds (trained together)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="first seed; seeds are FIRST … FIRST+N−1"),
    steps: Optional[int] = typer.Option(None, "--steps", help="run length; the schedule is stretched to fit"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<experiment>/<time>)"),
    sets: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set model.latent_dim=5"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train an experiment on several seeds at once, evaluate it and write a report."""
    overrides = list(sets)
    for name, value in (("seeds", seeds), ("seed", seed), ("steps", steps)):
        if value is not None:
            if value < (0 if name == "seed" else 1):
                fail(f"--{name} must be {'≥ 0' if name == 'seed' else 'a positive integer'}, got {value}")
            overrides.append(f"train.{name}={value}")
    try:
        cfg = experiments.load(experiment, overrides)
        t0 = time.perf_counter()
        with progress_bar(cfg.name, not quiet and sys.stderr.isatty()) as update:
            try:
                outcome = api.run(cfg, out_dir, progress=update)
            except TrainingInterrupted as e:
                fail(f"interrupted after step {e.step}; checkpoint saved — continue with `anchoring resume <run dir>`")
        print_outcome(outcome, time.perf_counter() - t0)
    except AnchoringError as e:
        fail(str(e))


@app.command("resume")
def resume_cmd(run_dir: Path = typer.Argument(..., help="run directory with a checkpoint"),
               quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Continue an interrupted run from its last checkpoint (same numbers as an unbroken run)."""
    try:
        t0 = time.perf_counter()
        with progress_bar("resume", not quiet and sys.stderr.isatty()) as update:
            try:
                outcome = api.resume(run_dir, progress=update)
            except TrainingInterrupted as e:
                fail(f"interrupted again after step {e.step}; checkpoint saved")
        print_outcome(outcome, time.perf_counter() - t0)
    except AnchoringError as e:
        fail(str(e))


@app.command("show")
def show_cmd(run_dir: Path = typer.Argument(..., help="finished run directory")) -> None:
    """Print a finished run's per-seed table and report path."""
    from anchoring.runs import load_run

    try:
        run = load_run(run_dir)
    except AnchoringError as e:
        fail(str(e))
    if run.summary is None:
        fail(f"{str(run_dir)!r} has not finished (no summary.json); `anchoring resume` it")
    print_outcome(api.Outcome(run.path, run.summary), run.summary.get("timing", {}).get("total_s", 0.0))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
