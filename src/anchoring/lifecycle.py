"""The run lifecycle, written once for every kind: validate → new run directory → train →
evaluate → report, and `resume`, `show` and `load_run` on any run directory.

Everything that can be checked is checked before a directory is created, so bad input writes
nothing; every file is written atomically; `summary.json` is written last and marks a finished
run. The kind of a run is looked up in `anchoring.kinds.REGISTRY`, the only dispatch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shlex
import time
import tomllib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from anchoring import runs, studies
from anchoring.config import ExperimentBase
from anchoring.errors import AnchoringError, UnfinishedRunWarning
from anchoring.experiments import load_config
from anchoring.kinds import REGISTRY, kind_name, kind_of
from anchoring.kinds.base import Progress, Run
from anchoring.train.skeleton import Diverged, TrainingInterrupted


@dataclass
class Outcome:
    path: Path
    summary: dict[str, Any]
    kind: str | None = None  # the run's kind, from its validated config; None: the summary's own (a run just written)
    from_disk: bool = False  # read back from summary.json (show), not just computed

    def lines(self) -> list[Any]:
        """What the CLI prints for this run: the kind's own lines. A summary.json read back that was
        edited or damaged into something else than its kind writes is one line, not the KeyError it
        meets half-way; a summary just computed is trusted, so a fault in a kind's lines shows as one."""
        kind = self.kind or kind_name(self.summary.get("kind"))
        if not self.from_disk:
            return REGISTRY[kind].summary_lines(self.summary)
        try:
            lines = REGISTRY[kind].summary_lines(self.summary)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise _not_a_summary(self.path, kind) from None
        if not lines:  # every kind's summary has something to say; `{}` printed nothing and exited 0
            raise _not_a_summary(self.path, kind)
        return lines


def _not_a_summary(path: Path, kind: str) -> AnchoringError:
    return AnchoringError(f"{str(path / runs.SUMMARY)!r} is not a summary of a {kind!r} run; re-run the experiment "
                          f"or restore the file")


def write_config(path: Path, cfg: ExperimentBase) -> None:
    """config.toml and, first, the digest a resume checks it against (written first: a run that has the
    config always has its digest)."""
    text = cfg.to_toml()
    runs.write_atomic(path / runs.CONFIG_DIGEST, hashlib.sha256(text.encode()).hexdigest() + "\n")
    runs.write_atomic(path / runs.CONFIG, text)


def validate(cfg: ExperimentBase) -> None:
    """Everything checkable without training."""
    kind = kind_of(cfg)
    if getattr(cfg, "study", None):
        studies.validate(cfg, kind)
    else:
        kind.validate(cfg)


def run(cfg: ExperimentBase, out: Path | None = None, progress: Progress | None = None) -> Outcome:
    """Train, evaluate and report an experiment into a new run directory."""
    validate(cfg)
    ours = out is None or not out.exists()  # a folder this call creates (a generated name is created by new_run_dir)
    path = runs.new_run_dir(cfg.name, out)  # a generated name is created there, so no other run can take it
    runs.check_writable(path)
    path.mkdir(parents=True, exist_ok=True)
    with _only_trainer(path):
        # a second start into the same --out could pass new_run_dir's check before this one wrote anything;
        # with the lock held, whoever comes second finds the first one's files
        runs.new_run_dir(cfg.name, path)
        try:
            write_config(path, cfg)
        except BaseException as e:
            if (path / runs.CONFIG).is_file():
                if isinstance(e, KeyboardInterrupt):  # with its config written the run starts from step 0 under `resume`
                    raise TrainingInterrupted(-1, path) from None
                raise
            failed = e
        else:
            return _execute_locked(cfg, path, progress)
    _unclaim(path, ours, generated=out is None)  # a digest without its config is no run: `run --out` would refuse it
    raise failed


def _unclaim(path: Path, ours: bool, generated: bool = False) -> None:
    """Take back what a start that never wrote its config left: the digest, and the folder if this
    start made it and it is empty now (with a generated name, its runs/<experiment>/ too, if empty)."""
    try:
        (path / runs.CONFIG_DIGEST).unlink(missing_ok=True)
        if ours and not any(path.iterdir()):
            path.rmdir()
            if generated:
                path.parent.rmdir()  # fails, as it should, when other runs are there
    except OSError:
        pass


@contextmanager
def _only_trainer(path: Path) -> Iterator[None]:
    """One process at a time trains a run: a second `resume` (or a sweep's merge) of a run still
    training would write the same checkpoints, and a second `run --out` into the same new folder
    would write over the first's config. The lock is on the run directory itself (no extra file in
    the run; config.toml is replaced by renames, so a lock on it would not hold), and the system drops
    it when the process ends, however it ends. The directory, held open, also tells whether it was
    deleted or moved while the run trained: the files written since then went to a new folder of the
    old name, one without the run's config, so no message may point there as if it were the run."""
    fd = _locked(path)
    if fd is None:
        raise AnchoringError(f"{str(path)!r} is being trained by another process; wait for it to finish, "
                             f"or stop it first")
    try:
        _clear_stale_temps(path)
        try:
            yield
        finally:
            _refuse_moved(path, os.fstat(fd))
    finally:
        os.close(fd)


STALE_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # `atomic.write_atomic`'s temporary names
OTHER_WRITERS = ("relearn", "interventions")  # folders of a run that commands other than its trainer write


def _clear_stale_temps(path: Path) -> None:
    """Delete the temporary files a trainer killed outright (SIGKILL, the OOM killer) left mid-write: a
    checkpoint's can be as large as the model. Only the lock holder writes the run's own files, so
    with the lock held no such file is still being written."""
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in OTHER_WRITERS]  # at every depth: a study's runs have their own
        for name in files:
            if STALE_TEMP.fullmatch(name):
                Path(root, name).unlink(missing_ok=True)


def _locked(path: Path) -> int | None:
    """The run directory opened and locked (closing the descriptor lets go), or None while another
    process holds the lock."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _refuse_moved(path: Path, held: os.stat_result) -> None:
    try:
        now = os.stat(path)
        same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
    except OSError:
        same = False
    if not same:
        raise AnchoringError(f"the run directory {str(path)!r} was deleted or moved while the run trained; what it "
                             f"wrote after that is in a new {str(path)!r} without the run's config (the moved folder, "
                             f"if any, resumes from its last checkpoint before the move)")


def _execute(cfg: ExperimentBase, path: Path, progress: Progress | None) -> Outcome:
    with _only_trainer(path):
        return _execute_locked(cfg, path, progress)


def _execute_locked(cfg: ExperimentBase, path: Path, progress: Progress | None) -> Outcome:
    kind = kind_of(cfg)
    t0 = time.perf_counter()
    try:
        if getattr(cfg, "study", None):
            summary = studies.execute(cfg, path, progress, _run_or_continue)
        else:
            arch = kind.architecture(cfg)
            if arch is not None:
                runs.write_json(path / runs.ARCH, arch)
            summary = kind.execute(cfg, path, progress)
    except KeyboardInterrupt:  # during evaluation or the report: training state is safe on disk
        raise TrainingInterrupted(-1, path) from None
    except TrainingInterrupted as e:
        raise TrainingInterrupted(e.step, path) from None
    except Diverged as e:  # resuming would meet the same step again: `show` and `resume` say so instead
        runs.write_atomic(path / runs.DIVERGED, str(e) + "\n")
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every file is written whole or not at all, so what the run saved is intact and resumes
        raise AnchoringError(f"{e.strerror} (in {str(path)!r}); the run keeps what it saved: make room, then "
                             f"`anchoring resume {path}` continues") from None
    summary.setdefault("kind", cfg.kind)
    summary.setdefault("timing", {})["total_s"] = round(time.perf_counter() - t0, 3)
    try:
        runs.write_json(path / runs.SUMMARY, summary)
    except KeyboardInterrupt:  # the summary is written atomically: either there or not, and resume writes it
        raise TrainingInterrupted(-1, path) from None
    return Outcome(path, summary, cfg.kind)


def _same_settings(saved: str, cfg: ExperimentBase) -> bool:
    """Whether a sub-run's saved config.toml is `cfg`'s, its description aside: that is prose, which a
    newer version may word otherwise (a compare study's variants name themselves in theirs), and a
    study stopped before such a change must still resume."""
    new = cfg.to_toml()
    if saved == new:
        return True
    try:
        old = tomllib.loads(saved)
    except tomllib.TOMLDecodeError:
        return False
    old.pop("description", None)
    return old == {k: v for k, v in tomllib.loads(new).items() if k != "description"}


def _run_or_continue(cfg: ExperimentBase, path: Path, progress: Progress | None) -> Outcome:
    """A study's sub-run: trained fresh, continued if a resumed study had started it, or reused
    if it had finished — but only when it was started from the very same config."""
    if (path / runs.CONFIG).is_file():
        if not _same_settings((path / runs.CONFIG).read_text(), cfg):
            raise AnchoringError(f"{str(path)!r} was started with other settings; choose another --out")
        return show(path) if (path / runs.SUMMARY).is_file() else _execute(cfg, path, progress)
    if path.is_dir() and {p.name for p in path.iterdir()} <= {runs.CONFIG_DIGEST}:  # a start stopped before its config
        _unclaim(path, ours=False)
    return run(cfg, path, progress)


def run_config(path: Path) -> ExperimentBase:
    """The config of a run whose models `load_run` can open, read without opening them; the same one
    line as `load_run` when `path` is not such a run."""
    cfg = _config(path)
    kind = kind_of(cfg)
    if not kind.trains:  # said for the commands that open a run too (intervene, delete, relearn …)
        raise AnchoringError(f"{str(path)!r} is a {kind.name!r} run: it draws figures and trains no model to open or edit")
    return cfg


def _config(path: Path) -> ExperimentBase:
    if not path.is_dir():
        raise AnchoringError(f"{str(path)!r} is not a run directory")
    if not (path / runs.CONFIG).is_file():
        if (path / "sweep.json").is_file():  # a sweep: one run per grid point, or (no grid) one run once merged
            points = sorted(p.name for p in (path / "points").iterdir() if (p / runs.CONFIG).is_file()) \
                if (path / "points").is_dir() else []
            shown = ", ".join(str(path / "points" / p) for p in points[:2]) + (" …" if len(points) > 2 else "")
            if (path / "report.html").is_file():
                raise AnchoringError(f"{str(path)!r} is a sweep: its table is in {str(path / 'report.html')!r}, and "
                                     f"each point is a run ({shown or 'none yet'})")
            raise _unfinished_sweep(path)
        raise AnchoringError(f"{str(path)!r} is not a run directory (no {runs.CONFIG})")
    return load_config(path / runs.CONFIG)


def _unfinished_sweep(path: Path) -> AnchoringError:
    return AnchoringError(f"{str(path)!r} is a sweep that has not finished; continue it with the command that started "
                          f"it: {_sweep_command(path)}")


def _sweep_command(path: Path) -> str:
    """The `anchoring sweep` command that continues the sweep at `path`, from its sweep.json (a
    sweep recorded before the experiment as typed and the backend were: its config name, locally)."""
    try:
        plan = runs.read_json(path / "sweep.json")
        ray = ["--backend", "ray"] if plan.get("backend") == "ray" else []
        ray += ["--address", plan["address"]] if ray and plan.get("address") else []
        args = ["anchoring", "sweep", plan.get("source") or plan["experiment"], *[a for s in plan["sets"] for a in ("--set", s)],
                *[a for key, values in plan["grid"] for a in ("--grid", f"{key}={','.join(values)}")],
                "--workers", str(plan["workers"]), *ray, "--out", str(path)]
    except (AnchoringError, KeyError, TypeError, ValueError):
        return f"anchoring sweep … --out {path}"
    return shlex.join(args)


def resumable_config(path: Path, warn: Callable[[str], None] | None = None):
    """The config of a run that can be resumed (refused: an edited run, a finished one, a config.toml
    edited since the run started). A run without config.sha256 (started before runs recorded it) is
    resumed unchecked, with a warning through `warn` (default: `warnings.warn`) rather than refused."""
    _unmerged_sweep(path)
    cfg = _config(path)
    if (path / "edit.json").is_file():
        raise AnchoringError(f"{str(path)!r} is an edited run (written by `anchoring delete`); there is no training to resume")
    if (path / runs.SUMMARY).is_file():
        raise AnchoringError(f"{str(path)!r} has already finished; `anchoring show {path}` prints it")
    _refuse_diverged(path, "resuming would meet the same step again: run it anew with a lower learning rate "
                           "or term weight")
    digest = path / runs.CONFIG_DIGEST
    if not digest.is_file():
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(
            f"{str(path)!r} has no {runs.CONFIG_DIGEST} (a run started by an older version), so it is resumed without "
            f"checking that {runs.CONFIG} is unchanged since it started")
    elif digest.read_text().strip() != hashlib.sha256((path / runs.CONFIG).read_bytes()).hexdigest():
        raise AnchoringError(f"{str(path / runs.CONFIG)!r} was edited after the run started, and its checkpoints were "
                             f"trained under the settings before; run the edited config as a new run "
                             f"(`anchoring run {path / runs.CONFIG} --out NEW`), or restore the file to resume")
    return cfg


def resume(path: Path, progress: Progress | None = None, warn: Callable[[str], None] | None = None) -> Outcome:
    """Continue an interrupted run from its checkpoints (or from step 0 if it had none yet)."""
    try:
        cfg = resumable_config(path, warn)
        runs.check_writable(path / runs.SUMMARY)
        validate(cfg)
        if _stopped_by_a_repair(path):  # evaluated again now, the repair recorded on its row
            (path / runs.DIVERGED).unlink()
    except KeyboardInterrupt:  # nothing was written yet: the run is as resumable as it was
        raise TrainingInterrupted(-1, path) from None
    return _execute(cfg, path, progress)


def finish_merged(path: Path) -> Outcome:
    """Evaluate and report a run whose checkpoint is already at its last step (a merged sweep)."""
    return _execute(_config(path), path, None)


def _summary(path: Path, cfg: ExperimentBase) -> dict[str, Any]:
    """summary.json of a run, checked against the run's validated config rather than trusted: the
    kind comes from the config, and a summary that is valid JSON but not what the kind writes (no
    experiment name, another kind's) is one line here instead of a traceback or an empty print."""
    summary = runs.read_json(path / runs.SUMMARY)
    if not isinstance(summary, dict) or not isinstance(summary.get("experiment"), str):
        raise _not_a_summary(path, cfg.kind)
    if "kind" in summary and kind_name(summary["kind"]) != cfg.kind:
        raise _not_a_summary(path, cfg.kind)
    return summary


def _unmerged_sweep(path: Path) -> None:
    """A sweep without a grid stopped while it merged its shards holds a config.toml, yet it is
    continued by its sweep command (which merges again), not by `resume` (which would train anew)."""
    if (path / "sweep.json").is_file() and (path / "shards").is_dir() and not (path / runs.SUMMARY).is_file():
        raise _unfinished_sweep(path)


STOPPED_BY_A_REPAIR = "the repair of "  # how diverged.txt began where an earlier version stopped an LM run in its evaluation


def _stopped_by_a_repair(path: Path) -> bool:
    """Whether the run's diverged.txt is an earlier version's stop of an LM run whose training had
    finished: a repair in its unlearning evaluation diverged. That is now recorded on the method's
    row instead, so resuming evaluates the run again rather than meeting the same step."""
    try:
        return (path / runs.DIVERGED).read_text().startswith(STOPPED_BY_A_REPAIR)
    except OSError:
        return False


def _refuse_diverged(path: Path, then: str) -> None:
    """A run whose training diverged is no interrupted run: its checkpoint leads to the same step. (A run
    an earlier version stopped at a diverging repair is not refused: see `_stopped_by_a_repair`.)"""
    if (path / runs.DIVERGED).is_file() and not _stopped_by_a_repair(path):
        said = (path / runs.DIVERGED).read_text().strip().split(" — ")[0]
        raise AnchoringError(f"{str(path)!r} diverged ({said}); {then}")


def show(path: Path) -> Outcome:
    """A finished run's summary, for printing."""
    _unmerged_sweep(path)
    cfg = _config(path)
    if not (path / runs.SUMMARY).is_file():
        _refuse_diverged(path, "it has no results")
        then = "it is training now, in another process" if training_now(path) else "`anchoring resume` it"
        raise AnchoringError(f"{str(path)!r} has not finished (no {runs.SUMMARY}); {then}")
    return Outcome(path, _summary(path, cfg), cfg.kind, from_disk=True)


def training_now(path: Path) -> bool:
    """Whether another process holds the run's trainer lock (so `resume` would be refused)."""
    try:
        fd = _locked(path)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def load_run(path: str | Path) -> Run:
    """Open any run directory for analysis: its config, trained models and the kind's helpers
    (colour: `encode`/`decode`; transformer: `tokenize`, `logits`, `loss_per_token`), and
    `metrics()` as a long-format DataFrame."""
    p = Path(path)
    cfg = run_config(p)
    kind = kind_of(cfg)
    if not (p / runs.ARCH).is_file():
        raise AnchoringError(f"{str(p)!r} is not a readable run (no {runs.ARCH})")
    arch = runs.read_json(p / runs.ARCH)
    if not isinstance(arch, dict):
        raise AnchoringError(f"{str(p / runs.ARCH)!r} is not an architecture description")
    if not kind.has_checkpoint(p):
        raise AnchoringError(f"{str(p)!r} has no trained weights yet; `anchoring resume` it")
    summary = _summary(p, cfg) if (p / runs.SUMMARY).is_file() else None
    run = kind.open(p, cfg, arch, summary)  # first: a checkpoint that cannot be read is an error, not also a warning
    if summary is None and runs.edit_record(p) is None:  # allowed (a look at a run in training), never unsaid
        warnings.warn(f"{str(p)!r} has not finished training: its models are those of its last checkpoint and it has no "
                      f"summary yet; `anchoring resume {p}` finishes it", UnfinishedRunWarning, stacklevel=2)
    return run
