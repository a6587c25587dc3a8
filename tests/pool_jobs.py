"""Job functions for `train.workers.run_jobs` tests: importable by spawned worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from anchoring.train.skeleton import TrainingInterrupted
from anchoring.train.workers import stop_asked


def job(folder: str, name: str, seconds: float, fail: bool = False) -> None:
    """Note this process's id, then 'train' for `seconds`, stopping as a training loop would (or,
    with `fail`, raise at the end as a diverged run does)."""
    out = Path(folder)
    (out / f"{name}.pid.tmp").write_text(str(os.getpid()))
    os.replace(out / f"{name}.pid.tmp", out / f"{name}.pid")  # a reader never sees it half-written
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if stop_asked():
            (out / f"{name}.stopped").write_text("")
            raise TrainingInterrupted(1)
        time.sleep(0.02)
    if fail:
        raise ValueError(f"{name} failed")
    (out / f"{name}.done").write_text("")
