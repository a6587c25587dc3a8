"""`list`, `run` and `resume`: train an experiment (in one process, worker processes or torchrun's
ranks) with a progress bar, and say how to continue after a stop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from anchoring import experiments, lifecycle, runtime
from anchoring.cli.common import app, err, fail, kinds_with, load_experiment, out, print_outcome, progress_bar, stopped, warning
from anchoring.errors import AnchoringError
from anchoring.kinds import kind_of
from anchoring.train import TrainingInterrupted
from anchoring.train.workers import sigterm_interrupts


@app.command("list")
def list_cmd() -> None:
    """Built-in experiments, one line each (upstream number in brackets)."""
    specs = experiments.builtin().values()
    wide = max(len(s.name) for s in specs) + 1
    tall = max(len(s.upstream or "") for s in specs) + 3  # the tags line up however long the longest is
    for spec in specs:
        tag = f"[{spec.upstream}]" if spec.upstream else ""
        default = " (default)" if spec.name == experiments.DEFAULT else ""
        out.print(f"{spec.name:<{wide}} {tag:<{tall}} {spec.description}{default}", markup=False, highlight=False)


@app.command("run")
def run_cmd(
    experiment: str = typer.Argument(experiments.DEFAULT, help="built-in name, ex-<number> alias, or a config .toml / run directory"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds (trained together)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="first seed; seeds are FIRST … FIRST+N−1"),
    steps: Optional[int] = typer.Option(None, "--steps", help="run length; the schedule is stretched to fit"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<experiment>/<time>)"),
    sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config key, e.g. --set model.latent_dim=5"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    select: Optional[str] = typer.Option(None, "--select", help="pareto: also report the edits on the seeds of the Pareto "
                                                                 "front (shorthand for --set evaluate.select=pareto)"),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="LM runs: data-parallel processes per job (= --set lm.nproc=N)"),
) -> None:
    """Train an experiment on several seeds at once, evaluate it and write a report."""
    if select is not None and select not in ("all", "pareto"):
        fail(f"--select must be all or pareto, not {select!r}")
    try:
        cfg, overrides = load_experiment(experiment, sets, seeds, seed, steps, select)
        if nproc is not None:
            key = kind_of(cfg).nproc_key
            if key is None:
                fail(f"--nproc is for {_parallel_kinds()} experiments; {cfg.name!r} is a {cfg.kind!r} experiment")
            if nproc < 1:
                fail(f"--nproc must be a positive integer, got {nproc}")
            if any(o.split("=", 1)[0].strip() == key for o in overrides):
                fail(f"give the number of processes once: --nproc or --set {key}, not both")
            _check_split(cfg, nproc, "--nproc")
            try:
                cfg = experiments.load(experiment, [*overrides, f"{key}={nproc}"])
            except AnchoringError as e:  # the flag's own bounds, named as the user typed them
                fail(str(e).replace(f"--set: {key}:", f"--nproc {nproc}:", 1))
            if nproc > (os.cpu_count() or 1):
                err.print(f"note: --nproc {nproc} on {os.cpu_count()} CPU cores: the ranks share cores and run slower "
                          f"than fewer would", markup=False, highlight=False, soft_wrap=True)
    except AnchoringError as e:
        fail(str(e))
    launched = runtime.launched_by_torchrun()
    if launched:
        if kind_of(cfg).nproc_key is None:
            fail(f"torchrun runs {_parallel_kinds()} experiments only; {cfg.name!r} is a {cfg.kind!r} experiment")
        if out_dir is None:
            fail(f"under torchrun, run {cfg.name!r} with --out DIR (every worker must write the same run)")
        _check_split(cfg, launched[1])
        if launched[0] != 0:  # rank 0 makes the run, trains its share and evaluates; the others only train
            _follow(cfg, out_dir, launched[0])
            return
        quiet = True
    _train(lambda update: lifecycle.run(cfg, out_dir, progress=update), cfg.name, quiet)


def _follow(cfg, path: Path, rank: int) -> None:
    """A torchrun rank other than 0 trains its share; rank 0 alone says how to resume after a stop."""
    try:
        kind_of(cfg).follow(cfg, path)
    except (TrainingInterrupted, KeyboardInterrupt):
        stopped(f"rank {rank}: interrupted; its checkpoint is saved")
    except AnchoringError as e:
        fail(str(e))


def _parallel_kinds() -> str:
    """The kinds that train data-parallel, as the errors name them."""
    return kinds_with(lambda k: k.nproc_key is not None)


def _check_split(cfg, world: int, flag: str | None = None) -> None:
    """A split the config cannot take is refused naming what asked for it: torchrun (every worker
    checks before rank 0 makes the run directory) or `flag` (--nproc, before the config takes it)."""
    why = kind_of(cfg).check_processes(cfg, world)
    if why:
        fail(f"{flag} {world}: {why}" if flag else f"under torchrun: {why}")


def _train(action, label: str, quiet: bool) -> None:
    """Train with a progress bar; Ctrl-C, or a SIGTERM at any moment (during evaluation too), leaves
    what was saved and says how to resume."""
    t0 = time.perf_counter()
    try:
        with sigterm_interrupts(), progress_bar(label, not quiet and sys.stderr.isatty()) as update:
            outcome = action(update)
    except TrainingInterrupted as e:
        where = (f"interrupted after step {e.step}; checkpoint saved" if e.step >= 0
                 else "interrupted; whatever the run had saved is kept")
        ranks = runtime.launched_by_torchrun()  # the ranks' checkpoints resume with as many processes as wrote them
        how = (f"torchrun --standalone --nproc-per-node {ranks[1]} -m anchoring resume {e.run_dir}" if ranks
               else f"anchoring resume {e.run_dir}")
        stopped(f"{where} — continue with `{how}`")
    except KeyboardInterrupt:
        stopped("interrupted before the run directory was written; nothing to resume")
    except AnchoringError as e:
        fail(str(e))
    print_outcome(outcome, time.perf_counter() - t0)


@app.command("resume")
def resume_cmd(run_dir: Path = typer.Argument(..., help="run directory with a checkpoint"),
               quiet: bool = typer.Option(False, "--quiet", "-q")) -> None:
    """Continue an interrupted run from its last checkpoint (same numbers as an unbroken run)."""
    launched = runtime.launched_by_torchrun()
    if launched:  # as in `run`: rank 0 resumes and evaluates, the other ranks only train their share
        try:
            cfg = lifecycle.resumable_config(run_dir, warn=lambda _: None)  # rank 0 warns below, in lifecycle.resume
            if kind_of(cfg).nproc_key is None:
                fail(f"torchrun resumes {_parallel_kinds()} runs only; {str(run_dir)!r} is a {cfg.kind!r} run")
            _check_split(cfg, launched[1])
            if launched[0] != 0:
                _follow(cfg, run_dir, launched[0])
                return
        except AnchoringError as e:
            fail(str(e))
        quiet = True
    _train(lambda update: lifecycle.resume(run_dir, progress=update, warn=warning), "resume", quiet)
