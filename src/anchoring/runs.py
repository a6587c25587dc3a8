"""Run directories, kind-agnostic: naming, atomic JSON/CSV writes, and reading them back safely.

Layout: config.toml (resolved, re-runnable), architecture.json, checkpoint.safetensors,
metrics.csv (long: one row per step and seed), figures/*.png, report.html, summary.json
(written last: its presence marks a finished run). `anchoring.lifecycle` drives the writing;
each kind adds its own files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from anchoring.atomic import sync_dir, temp_stem, write_atomic
from anchoring.errors import AnchoringError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,+=-]*$")  # a folder name a user may give inside a run
CONFIG, ARCH, SUMMARY, METRICS, SNAPSHOTS, REPORT = (
    "config.toml", "architecture.json", "summary.json", "metrics.csv", "snapshots.safetensors", "report.html")
EDIT = "edit.json"  # written by `anchoring delete`: what was edited, from which run, and the runs before it
CONFIG_DIGEST = "config.sha256"  # of config.toml as the run was started: a resume refuses a config edited since
DIVERGED = "diverged.txt"  # the divergence message of a run whose training stopped on a non-finite step

__all__ = ["ARCH", "CONFIG", "CONFIG_DIGEST", "METRICS", "REPORT", "SNAPSHOTS", "SUMMARY", "check_stageable", "check_writable", "new_run_dir",
           "read_json", "read_metrics", "staged", "write_atomic", "write_json", "write_metrics_csv"]


def new_run_dir(name: str, out: Path | None, root: Path = Path("runs"), resumable: bool = True) -> Path:
    """The run directory: `out` after refusing to overwrite an existing run (not created), or, without
    one, a new `root/name/<time>[-N]` created here. Creating the generated name is what claims it:
    two runs started in the same second could otherwise both pick, and share, one free name.
    `resumable`: whether the refusal may suggest `anchoring resume` (a training run; an edit is not resumed)."""
    if out is None:
        check_writable(root / name)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1, 10_000):
            out = root / name / (stamp if n == 1 else f"{stamp}-{n}")
            try:  # the parent too: a start that failed elsewhere removes it when it leaves it empty
                out.mkdir(parents=True)
                return out
            except FileExistsError:
                continue
        raise AnchoringError(f"no free run directory name under {str(root / name)!r}; give --out")
    if out.exists() and not out.is_dir():
        raise AnchoringError(f"{str(out)!r} is a file, not a directory (choose another --out)")
    if out.exists() and any(out.iterdir()):
        unfinished = (out / CONFIG).is_file() and not any((out / f).exists() for f in (SUMMARY, EDIT, DIVERGED))
        hint = ", or `anchoring resume` it" if resumable and unfinished else ""
        raise AnchoringError(f"{str(out)!r} already exists and is not empty (choose another --out{hint})")
    return out


@contextmanager
def staged(out: Path, replace: bool = False) -> Iterator[Path]:
    """A hidden sibling of `out` to write a whole run into; renamed to `out` only when the block
    ends without an error, removed otherwise. An edit stopped half-way (Ctrl-C, a full disk)
    leaves no directory that looks like a run to resume.

    `out` may already exist only as an empty folder, or, with `replace` (an edit written again
    under its name), as a whole earlier one: that is moved aside once the new one is complete, put
    back if the new one then fails to arrive, and deleted after, so a reader never sees the two mixed."""
    out = out.absolute()  # `--out .` has no name to make a sibling from
    tmp = out.parent / f"{temp_stem(out.name)}.partial-{os.getpid()}@{HOST}"
    old = out.parent / f"{temp_stem(out.name)}.replaced-{os.getpid()}@{HOST}"
    _clear_dead_siblings(out, replace)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moved = False
    try:
        yield tmp
        if out.is_dir() and replace:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            moved = True
        elif out.is_dir():
            out.rmdir()  # new_run_dir let it through only if empty
        os.replace(tmp, out)
        sync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not out.exists():
            os.replace(old, out)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # names this machine in a temporary's name


def _clear_dead_siblings(out: Path, replace: bool) -> None:
    """What a `staged(out)` killed outright (SIGKILL, a power cut) left beside `out`: its hidden
    partial copy, which may hold a whole model, and the earlier `out` it had moved aside (put back
    when it was killed before the new one arrived). A sibling whose process still runs is another
    edit's, and is left alone; so is one made on another machine (a shared file system), whose
    process number says nothing here. A name without a machine (written before they had one) is
    judged as this machine's."""
    if not out.parent.is_dir():
        return
    stem = temp_stem(out.name)
    for p in out.parent.iterdir():
        what, _, owner = p.name.removeprefix(stem + ".").partition("-")
        pid, _, host = owner.partition("@")
        if (not p.name.startswith(stem + ".") or what not in ("partial", "replaced") or not pid.isdigit()
                or host not in ("", HOST) or _alive(int(pid))):
            continue
        if what == "replaced" and not out.exists():  # killed between moving the earlier one aside and renaming the new
            if replace:
                os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_writable(path: Path) -> None:
    """Fail before any work when `path` (or its nearest existing parent) cannot be written."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise AnchoringError(f"cannot write under {str(path)!r}: {str(p)!r} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise AnchoringError(f"cannot write under {str(path)!r}: {str(p)!r} is not writable")
    try:  # some file systems (/proc, read-only mounts) pass the access check and still refuse
        probe = p / f".anchoring-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise AnchoringError(f"cannot write under {str(path)!r}: {e.strerror}") from None


def check_stageable(out: Path) -> None:
    """Fail before any work when `staged(out)` could not put its result in place: it writes a hidden
    sibling of `out` and renames it to `out`, so the parent must be writable (an empty `out` that is
    writable itself is not enough), and `out` cannot be a mount point (nothing is renamed onto one)."""
    out = out.absolute()
    if out.is_dir() and os.path.ismount(out):
        raise AnchoringError(f"cannot write the run to {str(out)!r}: it is a mount point, and a run is written beside "
                             f"its folder and renamed into place; give a folder inside it")
    check_writable(out)
    check_writable(out.parent)


def _finite(obj: Any) -> Any:
    """NaN and ±inf become None (JSON null): a missing number, never invalid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(_finite(obj), indent=2, allow_nan=False))


def edit_record(run_dir: Path) -> dict[str, Any] | None:
    """The record of a run written by `anchoring delete` (None for a trained run, or an unreadable
    record that is not a JSON object)."""
    path = run_dir / EDIT
    if not path.is_file():
        return None
    made = read_json(path)
    return made if isinstance(made, dict) else None


def read_json(path: Path) -> Any:
    """A JSON file of a run, or one line saying what is wrong with it."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise AnchoringError(f"cannot read {str(path)!r}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AnchoringError(f"{str(path)!r} is corrupt (not valid JSON); re-run the experiment or restore the file") from None


def write_metrics_csv(path: Path, header: list[str], rows, integer_columns: int = 2) -> None:
    """The first `integer_columns` (step, seed, …) as integers, every other column to 8
    significant digits (nan stays nan)."""
    rows = np.asarray(rows, dtype=np.float64)
    buf = io.StringIO()
    buf.write(",".join(header) + "\n")
    np.savetxt(buf, rows, fmt=["%d"] * integer_columns + ["%.8g"] * (rows.shape[1] - integer_columns), delimiter=",")
    write_atomic(path, buf.getvalue())


ID_COLUMNS = ("step", "seed", "arm", "anchored")


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.csv in long format: id columns (step, seed, and arm where a run has arms),
    then `metric` and `value`, one row per number."""
    p = run_dir / METRICS
    if not p.is_file():
        made = edit_record(run_dir)  # a run written by `anchoring delete` trained nothing itself
        lineage = made.get("lineage") if made else None
        first = lineage[0] if isinstance(lineage, list) and lineage else made  # an edit of an edit: the trained run
        source = first.get("source") if isinstance(first, dict) else None
        where = f"; its training curves are those of {source}" if isinstance(source, str) else ""
        if made is None and (run_dir / CONFIG).is_file() and not (run_dir / SUMMARY).is_file():
            where = (f": it has not finished training (the table is written at the end; its models are those of its "
                     f"last checkpoint); `anchoring resume {run_dir}` finishes it")
        raise AnchoringError(f"{str(run_dir)!r} has no {METRICS}{where}")
    with open(p, "rb") as f:  # every line is written whole, so a last line without its newline was cut off
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 1, 0))
        cut = size > 0 and f.read(1) != b"\n"
    if cut:
        raise AnchoringError(f"{str(p)!r} is cut short (its last line is incomplete): the file was truncated after "
                             f"the run wrote it")
    try:
        wide = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise AnchoringError(f"{str(p)!r} is not a metrics table ({type(e).__name__})") from None
    ids = [c for c in ID_COLUMNS if c in wide.columns]
    if "step" not in ids or "seed" not in ids or len(ids) == len(wide.columns):
        raise AnchoringError(f"{str(p)!r} is not a metrics table (needs step, seed and metric columns)")
    values = wide.drop(columns=ids)
    if not all(pd.api.types.is_numeric_dtype(t) for t in values.dtypes):
        raise AnchoringError(f"{str(p)!r} is not a metrics table (non-numeric values)")
    if "anchored" in ids and "arm" not in ids:  # the transformer's file marks its two arms 1/0: name them as an LM run does
        wide.insert(ids.index("anchored"), "arm", np.where(wide.pop("anchored") == 1, "anchored", "control"))
        ids[ids.index("anchored")] = "arm"
    return wide.melt(id_vars=ids, var_name="metric", value_name="value")
