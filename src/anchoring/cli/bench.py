"""`bench`: the trainer's throughput cases, each in a fresh process, as one table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from anchoring import runs
from anchoring.cli.common import app, err, fail, out
from anchoring.errors import AnchoringError
from anchoring.train.workers import sigterm_interrupts


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
    times = f"{repeats} repeat{'s' if repeats != 1 else ''}"
    table = Table(title=f"anchoring bench ({times}; colour: {steps} steps; {lm_part}; torch {res['machine']['torch']}, "
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
