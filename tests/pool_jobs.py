"""Job functions for `train.workers.run_jobs` tests: importable by spawned worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from anchoring.train.skeleton import TrainingInterrupted
from anchoring.train.workers import stop_asked


def job(folder: str, name: str, seconds: float, fail: bool = False, hold: bool = False, after: str | None = None) -> None:
    """Note this process's id, then 'train' for `seconds`, stopping as a training loop would (or,
    with `fail`, raise at the end as a diverged run does; with `hold`, not look at the stop flag, as a
    job still loading its data does not; with `after`, start the clock once that file exists)."""
    out = Path(folder)
    (out / f"{name}.pid.tmp").write_text(str(os.getpid()))
    os.replace(out / f"{name}.pid.tmp", out / f"{name}.pid")  # a reader never sees it half-written
    deadline = time.monotonic() + 60
    while after is not None and not (out / after).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if stop_asked() and not hold:
            (out / f"{name}.stopped").write_text("")
            raise TrainingInterrupted(1)
        time.sleep(0.02)
    if fail:
        raise ValueError(f"{name} failed")
    (out / f"{name}.done").write_text("")
