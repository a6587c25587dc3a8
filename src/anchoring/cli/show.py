"""`show`: a finished run's tables, or those of a sweep, a relearning attack or an intervention inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from anchoring import lifecycle, runs
from anchoring.cli.common import app, fail, out, print_lines, print_outcome
from anchoring.errors import AnchoringError
from anchoring.kinds import kind_of_run


@app.command("show")
def show_cmd(run_dir: Path = typer.Argument(..., help="finished run directory"),
             select: Optional[str] = typer.Option(None, "--select", help="pareto: also show the edits on the Pareto-selected seeds")) -> None:
    """Print a finished run's tables and report path (given RUN/relearn/CONCEPT or RUN/interventions/NAME: that table)."""
    if (run_dir / "sweep.json").is_file() and not (run_dir / runs.CONFIG).is_file() and (run_dir / runs.SUMMARY).is_file():
        _show_sweep(run_dir)
        return
    whole = run_dir.resolve()  # `anchoring show .` from inside the attack's folder too
    edit = whole.parent.name  # RUN/relearn/CONCEPT or RUN/interventions/NAME: a folder an edit wrote inside a run
    if edit in ("relearn", "interventions") and (whole.parent.parent / runs.CONFIG).is_file() and not (whole / runs.CONFIG).is_file():
        if not whole.exists():
            _no_such_edit(run_dir, whole)
        if edit == "interventions":
            _show_intervention(whole)
        elif (whole / runs.SUMMARY).is_file():
            _show_attack(run_dir)
        else:  # stopped before it wrote its table ("not a run directory" said nothing)
            fail(f"{str(run_dir)!r} is a relearning attack that has not finished; run `anchoring relearn "
                 f"{whole.parent.parent}` again to finish it")
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
        if not all(isinstance(p, dict) for p in points):
            raise TypeError("a point is not a table row")
    except (AnchoringError, KeyError, TypeError) as e:
        fail(f"{str(path / runs.SUMMARY)!r} is not a sweep's summary ({e})")
    print_lines([sweep_table(points, f"sweep of {summary.get('experiment', '?')}: medians over seeds per grid point")])
    report = path / runs.REPORT
    if report.is_file():
        out.print(f"report: {report}", markup=False, soft_wrap=True)
    for p in points:
        out.print(f"point {p.get('point')}: {p.get('path')}", markup=False, soft_wrap=True)
    if summary.get("diverged"):
        out.print(diverged_points(summary["diverged"]), markup=False, soft_wrap=True)


def _no_such_edit(given: Path, whole: Path) -> None:
    """RUN/relearn/NAME or RUN/interventions/NAME that was never written (a typo in the concept's or the
    intervention's name): say so and list the ones the run has, rather than the advice for a folder
    that an attack left unfinished."""
    what, command = (("relearning attack", "anchoring relearn") if whole.parent.name == "relearn"
                     else ("intervention", "anchoring intervene"))
    there = sorted(p.name for p in whole.parent.glob("*") if p.is_dir()) if whole.parent.is_dir() else []
    fail(f"{str(given)!r} does not exist; {whole.parent.parent} has "
         + (f"the {what}s {', '.join(there)}" if there else f"no {what} yet (`{command}` writes one)"))


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


def sweep_table(points: list[dict[str, Any]], title: str) -> Table:
    """A grid sweep's table, the same when the sweep ends and in `show` later: one row per point while
    its measures fit across (a colour sweep's few), else one column per point and one row per measure
    (an LM sweep's many, per arm and site)."""
    keys = list(dict.fromkeys(k for p in points for k in p if k not in ("point", "path")))
    table = Table(title=Text(title))
    if len(keys) <= 5:
        for k in ("point", *keys):
            table.add_column(k, justify="right")
        for p in points:
            table.add_row(*[sweep_cell(p.get(k)) for k in ("point", *keys)])
        return table
    table.add_column("")
    for p in points:
        table.add_column(str(p.get("point")), justify="right")
    for k in keys:
        table.add_row(k, *[sweep_cell(p.get(k)) for p in points])
    return table


def sweep_cell(v: Any) -> str:
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


def diverged_points(lost: list[dict]) -> str:
    """One line for a grid sweep's points that diverged (their shards are not retried)."""
    return (f"{len(lost)} grid point(s) diverged and have no results: "
            + "; ".join(f"{d.get('point')} ({d.get('message')})" for d in lost))
