"""`anchoring` command: parse, call the lifecycle or a kind, print what the kind says to print.

Every user mistake ends as one line `error: …` on stderr with exit code 2, and nothing written.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

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
from rich.table import Table
from rich.text import Text

from anchoring import __version__, experiments, lifecycle, runs
from anchoring.errors import AnchoringError
from anchoring.kinds import kind_of, kind_of_run
from anchoring.runtime import default_threads
from anchoring.train import TrainingInterrupted
from anchoring.train.workers import sigterm_interrupts

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Sparse concept anchoring: train, inspect, steer and delete concepts.")
out = Console(soft_wrap=True)  # one-line outputs stay one line (paths, list rows)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


_stop_said = False  # whether a Ctrl-C or SIGTERM has had its line (typer turns any other into a silent exit 130)


def stopped(message: str) -> NoReturn:
    """The one line a stopped command ends with, and exit code 130."""
    global _stop_said
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    _stop_said = True
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
            if now - last[0] > 0.1 or done == total:  # redraw ≤10×/s: the step itself is ~ms
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


def version_callback(value: bool) -> None:
    if value:
        out.print(f"anchoring {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="print the version and exit")) -> None:
    """Sparse concept anchoring: train, inspect, steer and delete concepts."""


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


@app.command("run")
def run_cmd(
    experiment: str = typer.Argument(experiments.DEFAULT, help="built-in name, ex-<number> alias, or a config .toml / run directory"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds (trained together)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="first seed; seeds are FIRST … FIRST+N−1"),
    steps: Optional[int] = typer.Option(None, "--steps", help="run length; the schedule is stretched to fit"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<experiment>/<time>)"),
    sets: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set model.latent_dim=5"),
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
            if cfg.kind != "lm":
                fail(f"--nproc is for LM experiments; {cfg.name!r} is a {cfg.kind!r} experiment")
            if nproc < 1:
                fail(f"--nproc must be a positive integer, got {nproc}")
            if any(o.split("=", 1)[0].strip() == "lm.nproc" for o in overrides):
                fail("give the number of processes once: --nproc or --set lm.nproc, not both")
            _check_split(cfg, nproc, "--nproc")
            try:
                cfg = experiments.load(experiment, [*overrides, f"lm.nproc={nproc}"])
            except AnchoringError as e:  # the flag's own bounds, named as the user typed them
                fail(str(e).replace("--set: lm.nproc:", f"--nproc {nproc}:", 1))
            if nproc > (os.cpu_count() or 1):
                err.print(f"note: --nproc {nproc} on {os.cpu_count()} CPU cores: the ranks share cores and run slower "
                          f"than fewer would", markup=False, highlight=False, soft_wrap=True)
    except AnchoringError as e:
        fail(str(e))
    from anchoring.kinds.lm.distributed import launched_by_torchrun

    launched = launched_by_torchrun()
    if launched:
        if cfg.kind != "lm" or out_dir is None:
            fail("under torchrun, run an LM experiment with --out DIR (every worker must write the same run)"
                 if cfg.kind == "lm" else f"torchrun runs LM experiments only; {cfg.name!r} is a {cfg.kind!r} experiment")
        _check_split(cfg, launched[1])
        if launched[0] != 0:  # rank 0 makes the run, trains its share and evaluates; the others only train
            _follow(cfg, out_dir, launched[0])
            return
        quiet = True
    _train(lambda update: lifecycle.run(cfg, out_dir, progress=update), cfg.name, quiet)


def _follow(cfg, path: Path, rank: int) -> None:
    """A torchrun rank other than 0 trains its share; rank 0 alone says how to resume after a stop."""
    from anchoring.kinds.lm import distributed

    try:
        distributed.follow(cfg, path)
    except (TrainingInterrupted, KeyboardInterrupt):
        stopped(f"rank {rank}: interrupted; its checkpoint is saved")
    except AnchoringError as e:
        fail(str(e))


def _check_split(cfg, world: int, flag: str | None = None) -> None:
    """A batch the processes cannot share is refused naming what asked for them: torchrun (every worker
    checks before rank 0 makes the run directory) or `flag` (--nproc, before the config takes it)."""
    if cfg.lm.batch_size % world:
        lead, whose = (f"{flag} {world}: ", "") if flag else ("", "torchrun's ")
        fail(f"{lead}lm.batch_size {cfg.lm.batch_size} does not split over {whose}{world} processes: give a multiple "
             f"of {world}")


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
        from anchoring.kinds.lm.distributed import launched_by_torchrun

        ranks = launched_by_torchrun()  # the ranks' checkpoints resume with as many processes as wrote them
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
    from anchoring.kinds.lm.distributed import launched_by_torchrun

    launched = launched_by_torchrun()
    if launched:  # as in `run`: rank 0 resumes and evaluates, the other ranks only train their share
        try:
            cfg = lifecycle.resumable_config(run_dir, warn=lambda _: None)  # rank 0 warns below, in lifecycle.resume
            if cfg.kind != "lm":
                fail("under torchrun, resume an LM run")
            _check_split(cfg, launched[1])
            if launched[0] != 0:
                _follow(cfg, run_dir, launched[0])
                return
        except AnchoringError as e:
            fail(str(e))
        quiet = True
    _train(lambda update: lifecycle.resume(run_dir, progress=update, warn=warning), "resume", quiet)


def warning(message: str) -> None:
    err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


@app.command("show")
def show_cmd(run_dir: Path = typer.Argument(..., help="finished run directory"),
             select: Optional[str] = typer.Option(None, "--select", help="pareto: also show the edits on the Pareto-selected seeds")) -> None:
    """Print a finished run's tables and report path (given RUN/relearn/CONCEPT or RUN/interventions/NAME: that table)."""
    if (run_dir / "sweep.json").is_file() and not (run_dir / runs.CONFIG).is_file() and (run_dir / runs.SUMMARY).is_file():
        _show_sweep(run_dir)
        return
    whole = run_dir.resolve()  # `anchoring show .` from inside the attack's folder too
    if whole.parent.name == "relearn" and (whole.parent.parent / runs.CONFIG).is_file() and not (whole / runs.CONFIG).is_file():
        if not (whole / runs.SUMMARY).is_file():  # stopped before it wrote its table ("not a run directory" said nothing)
            fail(f"{str(run_dir)!r} is a relearning attack that has not finished; run `anchoring relearn "
                 f"{whole.parent.parent}` again to finish it")
        _show_attack(run_dir)
        return
    if whole.parent.name == "interventions" and (whole.parent.parent / runs.CONFIG).is_file() and not (whole / runs.CONFIG).is_file():
        _show_intervention(whole)
        return
    try:
        outcome = lifecycle.show(run_dir)
    except AnchoringError as e:
        fail(str(e))
    if select is not None:
        if select not in ("all", "pareto"):
            fail(f"--select must be all or pareto, not {select!r}")
        if select == "pareto" and "selection" not in outcome.summary:
            fail(f"{str(run_dir)!r} has no Pareto selection (it needs a colour run with at least one edit)")
        outcome.summary["select"] = select
    timing = outcome.summary.get("timing")
    total = timing.get("total_s") if isinstance(timing, dict) else None
    known = isinstance(total, (int, float)) and not isinstance(total, bool)
    print_outcome(outcome, float(total) if known else None, recorded=True)  # an edited run records none
    for attack in sorted(p.parent for p in (run_dir / "relearn").glob(f"*/{runs.SUMMARY}")):
        out.print(f"relearning attack: {attack} (`anchoring show {attack}` prints its table)", markup=False, soft_wrap=True)


def _show_sweep(path: Path) -> None:
    """A finished grid sweep's table, one column per point and one row per measure (points are few,
    measures many), read back from its summary.json."""
    try:
        summary = runs.read_json(path / runs.SUMMARY)
        points = summary["points"]
        keys = list(dict.fromkeys(k for p in points for k in p if k not in ("point", "path")))
    except (AnchoringError, KeyError, TypeError) as e:
        fail(f"{str(path / runs.SUMMARY)!r} is not a sweep's summary ({e})")
    table = Table(title=Text(f"sweep of {summary.get('experiment', '?')}: medians over seeds per grid point"))
    table.add_column("")
    for p in points:
        table.add_column(str(p.get("point")), justify="right")

    for k in keys:
        table.add_row(k, *[_sweep_cell(p.get(k)) for p in points])
    print_lines([table])
    report = path / runs.REPORT
    if report.is_file():
        out.print(f"report: {report}", markup=False, soft_wrap=True)
    for p in points:
        out.print(f"point {p.get('point')}: {p.get('path')}", markup=False, soft_wrap=True)
    if summary.get("diverged"):
        out.print(_diverged_points(summary["diverged"]), markup=False, soft_wrap=True)


def _show_attack(path: Path) -> None:
    """A relearning attack's table and targets, read back by the run's kind from the summary.json
    `anchoring relearn` wrote."""
    try:
        kind = kind_of_run(path.resolve().parent.parent)
        summary = runs.read_json(path / runs.SUMMARY)
        lines = kind.attack_lines(summary) if isinstance(summary, dict) else None
    except AnchoringError as e:
        fail(str(e))
    except (KeyError, TypeError, ValueError, AttributeError):
        lines = None
    if not lines:
        fail(f"{str(path / runs.SUMMARY)!r} is not a relearning attack's summary")
    print_lines(lines)
    out.print(f"relearning attack on {path.resolve().parent.parent}", markup=False, soft_wrap=True)


def _sweep_cell(v: Any) -> str:
    """A sweep table's number: three decimals, so a row reads evenly; one under 0.01 (an MSE) in scientific
    notation, which keeps its digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    if isinstance(v, int) or v != v or abs(v) == float("inf"):
        return str(v)
    return f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"


def _show_intervention(path: Path) -> None:
    """An intervention's table (not the notes printed under it), read back by the run's kind from what
    `anchoring intervene` wrote in RUN/interventions/NAME."""
    try:
        lines = kind_of_run(path.parent.parent).intervention_lines(path)
    except AnchoringError as e:
        fail(str(e))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{str(path)!r}: cannot read the intervention's files ({e})")
    if not lines:
        fail(f"{str(path)!r} holds no intervention that `anchoring intervene` wrote")
    print_lines(lines)
    figs = sorted(p.name for p in path.glob("*.png"))
    out.print(f"intervention on {path.parent.parent}" + (f"; figures: {', '.join(figs)}" if figs else ""), markup=False,
              soft_wrap=True)


def _dims(text: str | None, flag: str = "--dims", example: str = "0,1", distinct: bool = False) -> list[int] | None:
    """Comma-separated integers given to `flag` (named in the error: --dims, or relearn's --samples);
    `distinct`: refuse a value given twice here (--dims repeats are refused with the edit's own line)."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected comma-separated integers, e.g. {example}")
    repeated = sorted({v for v in values if values.count(v) > 1}) if distinct else []
    if repeated:  # relearn printed the same K row twice
        fail(f"{flag} {text!r} names {', '.join(map(str, repeated))} twice")
    return values


def _edit_spec(name: str, method: str, concept: str | None, dims: str | None, falloff: str, k: float, site: str):
    from pydantic import ValidationError

    from anchoring.config import InterventionConfig

    if concept is None and dims is None:
        fail("give --concept NAME or --dims 0,1 (the run has no single concept to act on by default)")
    try:
        return InterventionConfig(name=name, method=method, concept=concept, dims=_dims(dims), falloff=falloff, k=k, site=site)
    except ValidationError as e:
        first = e.errors()[0]
        fail(f"--{first['loc'][0]}: {first['msg']}")


def _only_concept(cfg) -> str | None:
    """The run's concept when it has exactly one (an LM run always does), so --concept may be left out."""
    names = [cfg.text.concept] if cfg.kind == "lm" else [c.name for c in getattr(cfg, "concepts", [])]
    return names[0] if len(names) == 1 else None


def _open(run_dir: Path, finished: bool = False):
    """The run for an edit or an attack; `finished`: refuse a run still in training, whose edit would
    stay inside it, describing half-trained models, after it is resumed."""
    if finished and run_dir.is_dir() and (run_dir / runs.CONFIG).is_file() and not (run_dir / runs.SUMMARY).is_file():
        fail(f"{str(run_dir)!r} has not finished training; `anchoring resume {run_dir}` first")
    try:
        return lifecycle.load_run(run_dir)
    except AnchoringError as e:
        fail(str(e))


def _apply_edit(action, what: str = "the edit") -> None:
    """Run an edit, turning user errors into one line; print what the kind reports. Ctrl-C or a
    SIGTERM stops it as it stops `run`: one line and exit code 130. A run the edit was training
    (relearn's post-hoc baseline) keeps its checkpoint and is finished by `anchoring resume`; the
    edit, run again, then reuses it instead of training it anew."""
    try:
        with sigterm_interrupts():
            res = action()
    except TrainingInterrupted as e:
        if e.run_dir is None:
            stopped("interrupted; run the command again")
        where = f"after step {e.step}; checkpoint saved" if e.step >= 0 else "while evaluating it; its training is saved"
        stopped(f"interrupted training {e.run_dir} {where} — finish it with `anchoring resume {e.run_dir}`, "
                f"then run this command again")
    except KeyboardInterrupt:
        stopped(f"interrupted before {what} was complete; run the command again")
    except AnchoringError as e:
        fail(str(e))
    print_lines(res.lines)


@app.command("intervene")
def intervene_cmd(
    run_dir: Path = typer.Argument(..., help="finished run directory"),
    concept: Optional[str] = typer.Option(None, "--concept", help="concept whose anchor direction to act on "
                                                             "(default: the run's only concept, if it has one)"),
    method: str = typer.Option("suppress", "--method", help="suppress (every kind; the only one for LM runs) | repel, zero (colour) | ablate "
                                                          "(colour, transformer)"),
    falloff: str = typer.Option("constant", "--falloff", help="constant[:s] | linear:a,b | power:a,p,b | bezier:x1,y1,x2,y2,end"),
    dims: Optional[str] = typer.Option(None, "--dims", help="dims for --method zero or ablate, e.g. 0,1 (with --concept: "
                                                           "these dims, scored against that concept)"),
    k: float = typer.Option(2.0, "--k", help="selectivity exponent: R² of error vs similarity^k"),
    site: str = typer.Option("latent", "--site", show_default=False,
                             help="module path to intervene at (default: a colour model's latent, a transformer's or "
                                  "LM's anchored sites)"),
    name: Optional[str] = typer.Option(None, "--name", help="output folder name under RUN/interventions/"),
) -> None:
    """Apply an inference-time intervention to every model of a run; print and save what it breaks."""
    if method not in ("suppress", "repel", "zero", "ablate"):
        fail(f"--method must be suppress, repel, zero (colour) or ablate (colour, transformer), not {method!r}")
    run = None
    if concept is None and dims is None:  # the run's only concept: its other options are checked before it loads
        _edit_spec("check", method, "?", None, falloff, k, site)
        run = _open(run_dir, finished=True)
        concept = _only_concept(run.config)
    # the concept and the dims both, when both are given: the same concept with other dims is another edit
    what = "-".join(x for x in (concept, "dims" + dims.replace(",", "") if dims else None) if x) or "dims"
    label = name if name is not None else f"{method}-{what}-{falloff.replace(':', '-').replace(',', '_')}"
    if name is None and site != "latent" and runs.SAFE_NAME.match(f"{label}-at-{site}"):  # another site, another
        label += f"-at-{site}"  # folder (an odd site is left to the kind's own check of --site)
    spec = _edit_spec(label, method, concept, dims, falloff, k, site)
    run = run or _open(run_dir, finished=True)
    _apply_edit(lambda: kind_of(run.config).intervene(run, spec))


@app.command("delete")
def delete_cmd(
    run_dir: Path = typer.Argument(..., help="finished run directory"),
    out_dir: Path = typer.Option(..., "--out", help="where to write the edited run"),
    concept: Optional[str] = typer.Option(None, "--concept", help="delete this concept's anchored dims "
                                                             "(default: the run's only concept, if it has one)"),
    dims: Optional[str] = typer.Option(None, "--dims", help="or these dims, e.g. 0,1 (with --concept: these dims, "
                                                           "scored against that concept)"),
    method: str = typer.Option("ablate", "--method", help="ablate (zero weights; LM: the writers of the stream) | prune (remove dims) | "
                                                         "blind (LM: the readers after the anchored site)"),
    k: float = typer.Option(2.0, "--k", help="selectivity exponent"),
    site: str = typer.Option("latent", "--site", show_default=False,
                             help="module path whose dims to delete (default: a colour model's latent, a transformer's "
                                  "anchored sites; an LM takes none: it edits every residual writer, or the readers)"),
    repair_steps: int = typer.Option(0, "--repair-steps", help="LM: then fine-tune every edited model this many steps on "
                                                               "retain passages, the edit put back after each step"),
    repair_lr: Optional[float] = typer.Option(None, "--repair-lr", help="LM: the repair's learning rate "
                                                                        "(default: the run's unlearning.repair_lr)"),
) -> None:
    """Permanently delete a concept or dims from every seed; write an edited run."""
    if method not in ("ablate", "prune", "blind"):
        fail(f"--method must be ablate, prune or blind, not {method!r}")
    _edit_spec(method, method, concept or "?", dims, "constant", k, site)  # the options, before the run loads
    if out_dir.resolve().is_relative_to(run_dir.resolve()):  # the edited run would sit inside the one it came from
        fail(f"--out {str(out_dir)!r} is inside the source run {str(run_dir)!r}; write the edited run elsewhere")
    run = _open(run_dir, finished=True)
    if concept is None and dims is None:
        concept = _only_concept(run.config)
    spec = _edit_spec(method, method, concept, dims, "constant", k, site)
    if run.config.kind != "lm":
        if repair_steps or repair_lr is not None:
            fail(f"--repair-steps and --repair-lr are for 'lm' runs; this is a {run.config.kind!r} run")
        _apply_edit(lambda: kind_of(run.config).delete(run, spec, out_dir))
        return
    with progress_bar("repair and score" if repair_steps else "score", sys.stderr.isatty()) as update:  # the LM checks the options itself
        _apply_edit(lambda: kind_of(run.config).delete(run, spec, out_dir, repair_steps=repair_steps, repair_lr=repair_lr,
                                                       progress=update))


@app.command("relearn")
def relearn_cmd(
    run_dir: Path = typer.Argument(..., help="finished run directory (its concept is deleted, then fine-tuned)"),
    concept: Optional[str] = typer.Option(None, "--concept", help="concept to delete (colour default: red; an LM run: its own)"),
    samples: Optional[str] = typer.Option(None, "--samples", help="K values: concept samples (colour; default 1,4,16,64) or "
                                                                   "forget passages (LM; default unlearning.relearn_k) to fine-tune on"),
    steps: Optional[int] = typer.Option(None, "--steps", help="fine-tuning steps (colour: 200; LM: unlearning.relearn_steps)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="fine-tuning rate (colour: 0.01; LM: unlearning.relearn_lr)"),
    eval_chars: Optional[int] = typer.Option(None, "--eval-chars", help="LM: validation characters the curves are scored on "
                                                                        "(default unlearning.eval_chars)"),
    retain: Optional[int] = typer.Option(None, "--retain", help="colour: extra random colours mixed in (retain data; default 0)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="colour: concept MSE at which it counts as recovered "
                                                                        "(default 0.01)"),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline", help="colour: also attack a post-hoc (unanchored) "
                                                                                   "baseline (default: yes)"),
) -> None:
    """Relearning attack: delete the concept, fine-tune on K of its examples, see what comes back.

    Colour runs: steps until the concept's error falls back under --threshold. LM runs: the unlearning
    table of the run's own arms (forget/retain loss after each method, relearned loss, steps to recover),
    as `unlearning.enabled` computes it after training; it needs the control arm."""
    ks = None if samples is None else (_dims(samples, "--samples", "1,4,16", distinct=True) or [])
    run = _open(run_dir, finished=True)
    given = {"concept": concept, "samples": ks, "steps": steps, "lr": lr, "eval_chars": eval_chars, "retain": retain,
             "threshold": threshold, "baseline": baseline}
    label = "unlearning" if run.config.kind == "lm" else "baseline"
    with progress_bar(label, sys.stderr.isatty()) as update:
        _apply_edit(lambda: kind_of(run.config).relearn(run, **{k: v for k, v in given.items() if v is not None},
                                                        progress=update), "the attack")


@app.command("sweep")
def sweep_cmd(
    experiment: str = typer.Argument(experiments.DEFAULT, help="built-in name, ex-<number> alias, or a config .toml"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds per grid point"),
    seed: Optional[int] = typer.Option(None, "--seed", help="first seed"),
    steps: Optional[int] = typer.Option(None, "--steps", help="run length; the schedule is stretched to fit"),
    sets: list[str] = typer.Option([], "--set", help="override a config key for every point"),
    grid: list[str] = typer.Option([], "--grid", help="key=v1,v2: one grid axis (repeat for more axes)"),
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
    from anchoring.kinds.lm.distributed import launched_by_torchrun

    if launched_by_torchrun():  # every torchrun worker would run the whole sweep into the same folder
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
        table = Table(title=f"sweep of {name}")
        keys = [k for k in summary["points"][0] if k != "path"]

        if len(keys) <= 6:  # one row per point
            for k in keys:
                table.add_column(k, justify="right")
            for p in summary["points"]:
                table.add_row(*[_sweep_cell(p[k]) for k in keys])  # as `show` prints it later
        else:  # many columns (LM: per arm and site): one column per point instead
            table.add_column("")
            for p in summary["points"]:
                table.add_column(str(p["point"]), justify="right")
            for k in keys[1:]:
                table.add_row(k, *[_sweep_cell(p[k]) for p in summary["points"]])
        out.print(table)
        out.print(f"wall time {time.perf_counter() - t0:.1f} s", markup=False)
        out.print(f"report: {path / 'report.html'}", markup=False)
        if summary.get("diverged"):  # the healthy points are reported above; the command still fails
            fail(_diverged_points(summary["diverged"]))
    else:
        print_outcome(lifecycle.Outcome(path, summary), time.perf_counter() - t0)


def _diverged_points(lost: list[dict]) -> str:
    """One line for a grid sweep's points that diverged (their shards are not retried)."""
    return (f"{len(lost)} grid point(s) diverged and have no results: "
            + "; ".join(f"{d.get('point')} ({d.get('message')})" for d in lost))


def _drop_if_empty(path: Path | None) -> None:
    """The generated folder runs/<name>-sweep/<time> of a sweep refused or stopped before it wrote
    anything, and its parents if that leaves them empty: bad input writes nothing."""
    for p in (path, path.parent, path.parent.parent) if path is not None else ():
        try:
            p.rmdir()
        except OSError:
            return


@app.command("bench")
def bench_cmd(
    repeats: int = typer.Option(3, "--repeats", help="measurements per case (median, min and max are reported)"),
    steps: int = typer.Option(300, "--steps", help="training steps per throughput case"),
    ensembles: str = typer.Option("1,16,64", "--ensembles", help="ensemble sizes E to time, comma-separated"),
    e2e: str = typer.Option("1,60", "--e2e-seeds", help="seed counts for the end-to-end `anchoring run anchored` cases ('' for none)"),
    e2e_steps: Optional[int] = typer.Option(None, "--e2e-steps", help="shorten the end-to-end runs (default: full schedule)"),
    json_out: Path = typer.Option(Path("runs/bench/bench.json"), "--json", help="where to write the results as JSON"),
    lm_steps: int = typer.Option(30, "--lm-steps", help="timed steps of the LM cases (GPT-2-style baseline, project step, "
                                                        "anchoring on; 0 skips them)"),
    lm_compiled: bool = typer.Option(False, "--lm-compiled/--no-lm-compiled",
                                     help="also time both LM models through torch.compile, compiled project step against "
                                          "compiled baseline (each case compiles first, untimed)"),
    lm_device: str = typer.Option("cpu", "--lm-device", help="where the LM cases train, all of them alike: cpu or cuda"),
) -> None:
    """Benchmark the trainer: eager single-model baseline vs ensembles, end-to-end runs, LM step vs a GPT-2 baseline."""
    from anchoring.benchmarks import corpus_problem, run_suite

    def ints(text: str, flag: str) -> list[int]:
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            fail(f"{flag} takes comma-separated integers, got {text!r}")
        if any(v < 1 for v in vals):
            fail(f"{flag} values must be positive, got {text!r}")
        if len(set(vals)) != len(vals):  # two rows of one case name, timed twice
            fail(f"{flag} names a value twice: {text!r}")
        return vals

    for flag, value, least in (("--repeats", repeats, 1), ("--steps", steps, 2), ("--lm-steps", lm_steps, 0)):
        if value < least:
            fail(f"{flag} must be ≥ {least}, got {value}")
    if lm_compiled and not lm_steps:
        fail("--lm-compiled times LM cases, and --lm-steps 0 skips them: give --lm-steps N")
    if lm_device not in ("cpu", "cuda"):
        fail(f"--lm-device takes cpu or cuda, got {lm_device!r}")
    if lm_device != "cpu" and not lm_steps:
        fail(f"--lm-device {lm_device} places the LM cases, and --lm-steps 0 skips them: give --lm-steps N")
    import torch

    if lm_device == "cuda" and not torch.cuda.is_available():
        fail("--lm-device cuda: no CUDA device is available here")
    if lm_compiled and lm_device == "cpu":  # before the eager cases run, not after them
        from anchoring.kinds.lm.training import missing_cpp_compiler

        problem = missing_cpp_compiler()
        if problem:
            fail(f"--lm-compiled needs a C++ compiler for CPU kernels and found none ({problem}); install g++ or set CXX, "
                 f"or drop --lm-compiled")
    if e2e_steps is not None and e2e_steps < 1:
        fail(f"--e2e-steps must be a positive integer, got {e2e_steps}")
    if lm_steps and (problem := corpus_problem()):  # the LM and text cases load it: now, not after the colour cases
        fail(f"{problem} (the LM cases train on it), or give --lm-steps 0 to skip them")
    sizes, seeds = ints(ensembles, "--ensembles"), ints(e2e, "--e2e-seeds")
    try:  # before minutes of measuring, not after
        from anchoring.benchmarks.cases import ensemble_config
        from anchoring.kinds.colour.kind import memory_estimate
        from anchoring.resources import check_fits

        for e in sizes:
            check_fits(memory_estimate(ensemble_config(e, steps)), f"the ensemble case E={e}", "give --ensembles smaller sizes")
        if json_out.is_dir():
            raise AnchoringError(f"--json {str(json_out)!r} is a directory; give a file path")
        runs.check_writable(json_out.parent)
    except AnchoringError as e:
        fail(str(e))
    try:
        with sigterm_interrupts(), err.status("benchmarking") as status:  # a SIGTERM stops the case as Ctrl-C does
            res = run_suite(repeats, steps, sizes, seeds, e2e_steps, json_out, progress=lambda m: status.update(m), lm_steps=lm_steps,
                            lm_compiled=lm_compiled, lm_device=lm_device)
    except AnchoringError as e:  # a case whose process failed: its last line, nothing written
        fail(str(e))
    lm_part = f"LM: {lm_steps} steps on {lm_device}" if lm_steps else "no LM cases"
    table = Table(title=f"anchoring bench ({repeats} repeats; colour: {steps} steps; {lm_part}; torch {res['machine']['torch']}, "
                        f"{res['machine']['cpus']} CPUs)")
    for h in ("case", "median", "min", "max", "unit", "× baseline", "peak MB"):
        table.add_column(h, justify="left" if h == "case" else "right")
    for r in res["cases"]:
        ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else ""
        table.add_row(r["case"], *[_figure(r[k]) for k in ("median", "min", "max")], r["unit"], ratio, f"{r['peak_mb']:.0f}")
    Console(width=max(out.width, 132)).print(table)  # wide enough for one row per case, even when piped
    if "e2e_ratio" in res:
        a, b = res["e2e_ratio"]["cases"]
        out.print(f"end-to-end wall ratio ({a}) / ({b}): {res['e2e_ratio']['ratio']:.2f}", markup=False)
    out.print(f"json: {json_out}", markup=False)


def _figure(x: float) -> str:
    """A bench figure: whole numbers with thousands separators from 1,000 on (11,041, not 1.104e+04)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _lm_models(command: str, run_dir: Path, arm: str | None, seed: int | None, edit: str | None):
    """(run, the arm's model, the model under `edit` or None) of a language-model run, or one line why not."""
    run = _open(run_dir)  # reading only: a run still in training can be looked at
    if run.kind != "lm":
        fail(f"`{command}` applies to language-model runs, not {run.kind!r} runs")
    try:
        model = run.model(arm, seed)
        if edit is None:
            return run, model, None
        from anchoring.kinds.lm.edits import edited

        made = runs.edit_record(run.path)
        if made is not None:  # e.g. --edit delete on a deleted run: the two columns would be the same, unexplained
            how = made.get("method", "an edit")
            err.print(f"note: {str(run.path)!r} was written by `anchoring delete` ({how}); --edit {edit} acts on "
                      f"the edited weights", markup=False, highlight=False, soft_wrap=True)
        name = next(iter(run.arms)) if arm is None else arm
        if name != "anchored" and "anchored" in run.config.lm.arms:
            err.print(f"note: the {name} arm was trained without the anchor; --edit {edit} removes "
                      f"the anchored arm's directions from it, as a comparison", markup=False, highlight=False,
                      soft_wrap=True)
        return run, model, edited(model, run.config, edit)
    except AnchoringError as e:
        fail(str(e))


def _names_file(text: str) -> bool:
    """True when `text` is also the path of an existing file (a long or multi-line text never is)."""
    if "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL character
        return False


def _read_text(file: Path) -> str:
    """A text file exactly as written (line endings kept: the page shows a carriage return as ␍), less a
    leading byte-order mark, which is an encoding marker and not text; `-` reads standard input."""
    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read --file {str(file)!r}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}")
    return text.removeprefix("\ufeff")


@app.command("surprisal")
def surprisal_cmd(
    run_dir: Path = typer.Argument(..., help="a language-model run"),
    text: Optional[str] = typer.Argument(None, help="text to score, taken literally (or --file)"),
    file: Optional[Path] = typer.Option(None, "--file", help="read the text from this UTF-8 file (- reads standard input)"),
    arm: Optional[str] = typer.Option(None, "--arm", help="which arm's model (default: the first)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="which seed's model (default: the first)"),
    edit: Optional[str] = typer.Option(None, "--edit", help="suppress | delete | blind: show the text before and after"),
    out_path: Path = typer.Option(Path("surprisal.html"), "--out", help="where to write the page"),
) -> None:
    """Per-token surprisal, entropy and s₂ of a text under an LM run, as a page you open in a browser."""
    from anchoring.report.surprise_page import check_page_path, render_surprise, unknown_characters, write_surprise_page

    if text is None and file is None:
        fail("give the text to score as an argument or with --file")
    if text is not None and file is not None:
        fail("give the text as an argument or with --file, not both")
    try:
        check_page_path(out_path)  # before the minutes of scoring
    except AnchoringError as e:
        fail(f"--out {e}")
    if file is not None:
        text = _read_text(file)
    elif _names_file(text):  # scored as typed, but say so: `surprisal RUN notes.txt` most likely meant --file
        err.print(f"note: {text!r} is also a file; the argument is scored as text (use --file {text} for the file)",
                  markup=False, highlight=False, soft_wrap=True)
    run, model, after = _lm_models("surprisal", run_dir, arm, seed, edit)
    if len(run.data.tokenizer.encode(text)) < 2:  # a page of no scores; the library still renders one
        fail("nothing to score: the text is empty" if not text else
             f"nothing to score: {text!r} is one token, and a token is scored from the ones before it")
    try:
        which = f"{next(iter(run.arms)) if arm is None else arm} arm, seed {run.seeds[0] if seed is None else seed}"
        title = f"{run.path.resolve().name} ({run.config.name}): {which}" + (f", before and after {edit}" if edit else "")
        page = render_surprise(model, run.data.tokenizer, text, context=model.context, edited_model=after, title=title)
        runs.check_writable(out_path.parent)  # the page itself may exist: writing it again replaces it
        replacing = out_path.exists()
        write_surprise_page(out_path, page)
    except AnchoringError as e:
        fail(str(e))
    unseen = unknown_characters(run.data.tokenizer, text)
    if unseen:  # they were scored as the unknown token, so their numbers say nothing about the characters
        more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
        err.print(f"warning: the text has characters the model never saw in training, scored as the unknown token: "
                  f"{unseen[:10]!r}{more}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"page: {out_path}" + (" (replacing an earlier page)" if replacing else ""), markup=False, soft_wrap=True)


@app.command("generate")
def generate_cmd(
    run_dir: Path = typer.Argument(..., help="a language-model run"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    arm: Optional[str] = typer.Option(None, "--arm", help="which arm (default: the first)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="which seed's model (default: the first)"),
    edit: Optional[str] = typer.Option(None, "--edit", help="suppress | delete | blind: continue with and without the edit"),
    n: int = typer.Option(200, "-n", help="tokens to generate"),
    temperature: float = typer.Option(0.8, "--temperature", help="0: greedy"),
    samples: int = typer.Option(2, "--samples", help="continuations per model (sampling seeds 0 … N−1)"),
) -> None:
    """Continuations of a prompt, side by side with and without an edit (same sampling seeds)."""
    if n < 1:
        fail(f"-n (tokens to generate) must be ≥ 1, got {n}")
    if samples < 1:
        fail(f"--samples (continuations per model) must be ≥ 1, got {samples}")
    if not 0 <= temperature < float("inf"):
        fail(f"--temperature must be a finite number ≥ 0 (0: greedy), got {temperature}")
    run, model, after = _lm_models("generate", run_dir, arm, seed, edit)
    try:
        which = f"{next(iter(run.arms)) if arm is None else arm} arm, seed {run.seeds[0] if seed is None else seed}"
        table = Table(title=Text(f"{run.config.name}: {which}"), show_lines=True)
        table.add_column("sample", justify="right")
        table.add_column("as trained")
        if after is not None:
            table.add_column(f"after {edit}")
        for k in range(samples):
            cells = [run.generate(prompt, n=n, temperature=temperature, sample_seed=k, model=model)]
            if after is not None:
                cells.append(run.generate(prompt, n=n, temperature=temperature, sample_seed=k, model=after))
            table.add_row(str(k), *[Text(c) for c in cells])  # plain text: Shakespeare's "[Exit.]" is not markup
    except AnchoringError as e:
        fail(str(e))
    out.print(table)


@app.command("labels")
def labels_cmd(
    concept: str = typer.Argument(..., help="violence | deception | milton"),
    corpus: str = typer.Option("shakespeare", "--corpus", help="shakespeare | milton | mixed | a folder of .txt files"),
    coverage: float = typer.Option(0.3, "--coverage", help="share of reference positives that carry a weak label"),
    false_positives: float = typer.Option(0.0, "--false-positives", help="share of reference negatives labelled"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for report.html and summary.json"),
) -> None:
    """Weak labels for a text concept: rates per labelling function, overlaps, gold precision/recall."""
    from anchoring.domains.text.report import label_report

    try:
        rows, path, replacing = label_report(concept, corpus, coverage, false_positives, out_dir)
    except AnchoringError as e:
        fail(str(e))
    table = Table(title=Text(f"{concept} labels on {corpus}"))
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    if path is not None:
        out.print(f"report: {path / 'report.html'}" + (" (replacing an earlier labels report)" if replacing else ""),
                  markup=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    global _stop_said
    _stop_said = False
    default_threads()
    try:
        app(args=argv)
    except SystemExit as e:
        if e.code == 130 and not _stop_said:  # stopped outside every command's own handler (loading a run, say)
            err.print("interrupted", markup=False, highlight=False)
        raise
    except OSError as e:  # a full disk, a file vanished under a run: the system's reason, in one line
        where = f": {e.filename}" if e.filename else ""
        err.print(f"error: {e.strerror or e}{where}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
