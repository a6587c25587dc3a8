"""What every command shares: the typer app, the two consoles, the one-line failure and stop, the
progress bar, printing a kind's lines, and reading an experiment with its flags or a run from disk."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from anchoring import __version__, experiments, lifecycle, runs
from anchoring.errors import AnchoringError, UnfinishedRunWarning
from anchoring.kinds import REGISTRY, Kind

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Sparse concept anchoring: train, inspect, steer and delete concepts.")


out = Console(soft_wrap=True)  # one-line outputs stay one line (paths, list rows)


err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


stop_said = False  # whether a Ctrl-C or SIGTERM has had its line (typer turns any other into a silent exit 130)


def stopped(message: str) -> NoReturn:
    """The one line a stopped command ends with, and exit code 130."""
    global stop_said
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    stop_said = True
    raise typer.Exit(130)


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
            if bar.tasks[0].total != total:  # the first report (a resumed run starts at its checkpoint), or a new total:
                bar.reset(task, total=total, completed=done)  # the jump to `done` is not speed, or the ETA starts near 0
                last[0] = now
            elif now - last[0] > 0.1 or done == total:  # redraw ≤10×/s: the step itself is ~ms
                bar.update(task, completed=done, total=total)
                last[0] = now

        yield update


def print_lines(lines: list) -> None:
    for line in lines:
        if isinstance(line, str):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            out.print(line)


def print_outcome(outcome: lifecycle.Outcome, wall: float | None, recorded: bool = False) -> None:
    """The kind's own lines for the run, then how long it took (`recorded`: the run's own record, read
    back later, rather than this command's time; None: unknown) and where the report is."""
    try:
        lines = outcome.lines()  # all of them before any is printed: a broken summary is one line, not half a table
    except AnchoringError as e:
        fail(str(e))
    print_lines(lines)
    if wall is not None:
        out.print(f"wall time {wall:.1f} s" + (" (as the run recorded it, without the command's start-up)" if recorded else ""), markup=False)
    report = outcome.path / "report.html"
    if report.is_file():
        out.print(f"report: {report}", markup=False, soft_wrap=True)


def warning(message: str) -> None:
    err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"anchoring {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit")) -> None:
    """Sparse concept anchoring: train, inspect, steer and delete concepts."""


def train_overrides(sets: list[str], seeds: int | None, seed: int | None, steps: int | None) -> list[str]:
    """--set items plus the --seeds/--seed/--steps shortcuts, checked."""
    overrides = list(sets)
    for name, value in (("seeds", seeds), ("seed", seed), ("steps", steps)):
        if value is not None:
            if value < (0 if name == "seed" else 1):
                fail(f"--{name} must be {'≥ 0' if name == 'seed' else 'a positive integer'}, got {value}")
            overrides.append(f"train.{name}={value}")
    return overrides


FLAG_KEYS = {"--seeds": "train.seeds", "--seed": "train.seed", "--steps": "train.steps", "--select": "evaluate.select"}


def _has_key(cfg, dotted: str) -> bool:
    node = cfg.model_dump()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_experiment(experiment: str, sets: list[str], seeds: int | None = None, seed: int | None = None,
                    steps: int | None = None, select: str | None = None):
    """(config, overrides): the experiment with its --set items and the flag shortcuts. The flags are
    checked against the experiment as --set leaves it, so that a flag its kind has no key for is
    named as the flag (not as the key it stands for), and --seeds/--seed next to a train.seed_list,
    which would quietly win over them, are refused."""
    overrides = train_overrides(sets, seeds, seed, steps)
    if select is not None:
        overrides.append(f"evaluate.select={select}")
    given = [f for f, v in (("--seeds", seeds), ("--seed", seed), ("--steps", steps), ("--select", select)) if v is not None]
    if given:
        try:
            base = experiments.load(experiment, sets)
        except AnchoringError:  # a check that needs the flags' values (one train.term_masks row per --seeds member)
            base = experiments.load(experiment, overrides)
        for flag in given:
            if not _has_key(base, FLAG_KEYS[flag]):
                raise AnchoringError(f"{flag} does not apply to {base.name!r}: a {base.kind!r} experiment has no "
                                     f"{FLAG_KEYS[flag]}")
    # flags and --set items that a train.seed_list would quietly win over
    chosen = [f for f, v in (("--seeds", seeds), ("--seed", seed)) if v is not None]
    chosen += [f"--set {k}" for k in ("train.seeds", "train.seed") if any(o.split("=", 1)[0].strip() == k for o in sets)]
    cfg = experiments.load(experiment, overrides)
    if chosen and getattr(getattr(cfg, "train", None), "seed_list", None) is not None:
        raise AnchoringError(f"train.seed_list {cfg.train.seed_list} sets the seeds, so {' and '.join(chosen)} would be "
                             f"ignored; give one or the other")
    return cfg, overrides


def kinds_with(has: Callable[[Kind], bool]) -> str:
    """The kinds that have a capability, as an error names them ('lm', or 'a' and 'b')."""
    return " and ".join(repr(k.name) for k in REGISTRY.values() if has(k))


def refuse_unfinished(run_dir: Path) -> None:
    """Refuse a run still in training to an edit or attack, whose result would stay inside it, describing
    half-trained models, after it is resumed."""
    if run_dir.is_dir() and (run_dir / runs.CONFIG).is_file() and not (run_dir / runs.SUMMARY).is_file():
        fail(f"{str(run_dir)!r} has not finished training; `anchoring resume {run_dir}` first")


def open_run(run_dir: Path, finished: bool = False):
    """The run for an edit or an attack; `finished`: refuse a run still in training (`refuse_unfinished`)."""
    if finished:
        refuse_unfinished(run_dir)
    try:
        with warnings.catch_warnings(record=True) as said:  # a run in training, opened to read: one note line
            warnings.simplefilter("always", UnfinishedRunWarning)
            run = lifecycle.load_run(run_dir)
    except AnchoringError as e:
        fail(str(e))
    for w in said:
        if issubclass(w.category, UnfinishedRunWarning):
            err.print(f"note: {w.message}", markup=False, highlight=False, soft_wrap=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # anything else as it was
    return run
