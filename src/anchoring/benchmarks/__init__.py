"""Benchmark suite behind `anchoring bench`.

Every case runs in a fresh process, so its peak memory is its own and no case warms caches
for the next; repeats are interleaved (baseline, E=1, E=16, …, baseline, …) so a noisy
neighbour slows all cases alike and the ratios stay meaningful. Each figure is reported as
median, min and max over the repeats.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import median


@dataclass
class Case:
    name: str
    unit: str
    argv: list[str]  # what the child process runs
    end_to_end: bool = False
    samples: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)  # per repeat: what the child reported besides its figure
    versus: str | None = None  # the case its "× baseline" is taken against (default: the suite's baseline of its unit)
    needs_corpus: bool = False  # trains on or reads the Shakespeare corpus (the LM and text cases)


def _child(case: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "anchoring.benchmarks.child", case, *args]


def corpus_problem() -> str | None:
    """Why the Shakespeare corpus is unusable, in the line the text loader itself gives, or None. Asked
    before measuring: the LM cases load it, and finding it missing only inside a child process comes
    after a whole repeat of the colour cases."""
    from anchoring.domains.text import corpus

    try:
        corpus.shakespeare_files()
    except AnchoringError as e:
        return str(e)
    return None


LM_BASELINE = "lm: GPT-2-style baseline (4×4×128, block 64, batch 12)"
LM_BASELINE_COMPILED = "lm: GPT-2-style baseline, torch.compile"


def plan(steps: int, ensemble_sizes: list[int], e2e_seeds: list[int], e2e_steps: int | None, lm_steps: int = 0,
         lm_compiled: bool = False, lm_device: str = "cpu") -> list[Case]:
    cases = [Case("eager baseline (1 model)", "model-steps/s", _child("eager", str(steps)))]
    for e in ensemble_sizes:
        cases.append(Case(f"ensemble E={e}", "model-steps/s", _child("ensemble", str(e), str(steps), "fast")))
    if ensemble_sizes:
        e = max(ensemble_sizes)
        cases.append(Case(f"ensemble E={e}, generic vmap path", "model-steps/s", _child("ensemble", str(e), str(steps), "generic")))
    for n in e2e_seeds:
        argv = [sys.executable, "-m", "anchoring", "run", "anchored", "--seeds", str(n), "-q"]
        if e2e_steps is not None:
            argv += ["--steps", str(e2e_steps)]
        steps_flag = "" if e2e_steps is None else f" --steps {e2e_steps}"  # a shortened run says so in its name
        cases.append(Case(f"anchoring run anchored --seeds {n}{steps_flag}", "s wall", argv, end_to_end=True))
    if lm_steps:  # LM cases: tokens/s, compared with the GPT-2-style baseline (not the colour one)
        dev = ["cuda"] if lm_device == "cuda" else []  # every LM training case, baseline included, on the same device

        def lm(name: str, *args: str, versus: str | None = None) -> Case:
            return Case(name, "tokens/s", _child("lm", *args, *dev), versus=versus, needs_corpus=True)

        cases += [lm(LM_BASELINE, "gpt2", str(lm_steps)),
                  lm("lm: project step (nGPT, SwiGLU hidden 344: same size)", "project", str(lm_steps), "344"),
                  lm("lm: project step, anchoring on", "anchored", str(lm_steps), "344"),
                  lm("lm: project step, LM default SwiGLU 4× (hidden 512)", "project", str(lm_steps), "512"),
                  *([lm(LM_BASELINE_COMPILED, "gpt2", str(lm_steps), "compiled"),
                     # compiled against compiled: the fair comparison once both get fused kernels
                     lm("lm: project step, train.compile (vs compiled baseline)", "project", str(lm_steps), "344", "compiled",
                        versus=LM_BASELINE_COMPILED)]
                    if lm_compiled else []),
                  Case("surprise page: 10,000 characters, default LM", "s", _child("surprise")),
                  # the LM cases above need the corpus too, so it is checked for all of them before measuring
                  Case("text: load, split, tokenize, label Shakespeare (warm)", "s", _child("text"), needs_corpus=True)]
    return cases


def _measure(case: Case, workdir: Path) -> None:
    """Run the case once; append its figure and the child's peak RSS."""
    argv = list(case.argv)
    if case.end_to_end:
        out_dir = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        argv += ["--out", str(out_dir)]
    log_out, log_err = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe)
        try:
            # wait4 gives this child's own peak RSS (KiB on Linux), not a running max over all children
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM: the case stops before its temporary folder is removed
            _stop(proc)
            raise
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen, or it waits again
    peak = usage.ru_maxrss / 1024.0
    stdout, stderr = log_out.read_text(), log_err.read_text()
    if proc.returncode != 0:
        last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), f"exit status {proc.returncode}")
        raise AnchoringError(f"benchmark case {case.name!r} failed: {last}")
    if case.end_to_end:
        case.samples.append(wall)
        summary = json.loads((out_dir / "summary.json").read_text())
        case.extras.append({"train_s": summary.get("timing", {}).get("train_s"), "anchored": summary.get("anchored_seeds")})
        shutil.rmtree(out_dir.parent, ignore_errors=True)
    else:
        res = json.loads(stdout.strip().splitlines()[-1])
        key = {"tokens/s": "tokens_per_s", "s": "seconds"}.get(case.unit, "model_steps_per_s")
        case.samples.append(res[key])
        case.extras.append({k: v for k, v in res.items() if k != key})
    case.peak_mb.append(peak)


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a case's process and wait for it: a SIGINT, which a training child answers by saving and
    stopping (a terminal's Ctrl-C has sent it one already), then a kill after `grace` seconds. Left
    running, it went on writing into the folder being removed, or trained on as an orphan."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(grace)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a hung case, or a further Ctrl-C: no waiting
            proc.kill()
            proc.wait()
            raise KeyboardInterrupt from None


def _extras(extras: list[dict]) -> dict:
    """The children's other figures over the repeats: peaks as their maximum (like `peak_mb`), what every
    repeat agrees on as it is, and what varies as `per_repeat` lists in the order of `samples`, so no
    figure of one repeat stands next to the median as if it described them all."""
    keys = list(dict.fromkeys(k for e in extras for k in e))
    out: dict = {}
    varying: dict = {}
    for k in keys:
        vals = [e.get(k) for e in extras]
        if k.endswith("peak_mb") and all(isinstance(v, (int, float)) for v in vals):
            out[k] = max(vals)
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        else:
            varying[k] = vals
    return out | ({"per_repeat": varying} if varying else {})


def _stats(xs: list[float]) -> dict:
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def run_suite(repeats: int = 3, steps: int = 300, ensemble_sizes: list[int] | None = None,
              e2e_seeds: list[int] | None = None, e2e_steps: int | None = None,
              json_path: Path | None = None, progress: Callable[[str], None] | None = None, lm_steps: int = 0,
              lm_compiled: bool = False, lm_device: str = "cpu") -> dict:
    """Measure every case `repeats` times, interleaved; return (and optionally write) the results."""
    ensemble_sizes = [1, 16, 64] if ensemble_sizes is None else ensemble_sizes
    e2e_seeds = [1, 60] if e2e_seeds is None else e2e_seeds
    cases = plan(steps, ensemble_sizes, e2e_seeds, e2e_steps, lm_steps, lm_compiled, lm_device)
    if any(c.needs_corpus for c in cases) and (problem := corpus_problem()):
        raise AnchoringError(problem)
    with tempfile.TemporaryDirectory(prefix="anchoring-bench-") as tmp:
        for r in range(repeats):
            for case in cases:
                if progress:
                    progress(f"repeat {r + 1}/{repeats}: {case.name}")
                _measure(case, Path(tmp))
    medians = {c.name: median(c.samples) for c in cases if c.samples}
    base, lm_base = medians[cases[0].name], medians.get(LM_BASELINE)
    rows = []
    for case in cases:
        row = {"case": case.name, "unit": case.unit, **_stats(case.samples),
               "peak_mb": max(case.peak_mb) if case.peak_mb else None, "samples": case.samples, **_extras(case.extras)}
        if case.versus is not None:
            row["vs_baseline"] = row["median"] / medians[case.versus]
            row["versus"] = case.versus
        elif case.unit == "model-steps/s":
            row["vs_baseline"] = row["median"] / base
        elif case.unit == "tokens/s" and lm_base:
            row["vs_baseline"] = row["median"] / lm_base
        rows.append(row)
    e2e = {c.name: median(c.samples) for c in cases if c.end_to_end}
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "settings": {"repeats": repeats, "steps": steps, "ensemble_sizes": ensemble_sizes, "e2e_seeds": e2e_seeds,
                     "e2e_steps": e2e_steps, "lm_steps": lm_steps, "lm_compiled": lm_compiled, "lm_device": lm_device},
        "cases": rows,
    }
    if len(e2e) >= 2:
        names = list(e2e)
        result["e2e_ratio"] = {"cases": [names[-1], names[0]], "ratio": e2e[names[-1]] / e2e[names[0]]}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, json.dumps(result, indent=2))
    return result
