"""Shared check: a SIGTERM sent to a run's parent process alone stops its worker processes too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def sigterm_stops_the_workers(args: list[str], out: Path, checkpoints: int = 2) -> None:
    """Start `anchoring run ARGS --out OUT -q` (checkpointing every few steps into OUT/arms), wait until
    `checkpoints` workers have saved, SIGTERM the parent only, and check that it stops with the resume
    hint and that no worker writes a checkpoint after it has gone."""
    proc = subprocess.Popen([sys.executable, "-m", "anchoring", "run", *args, "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    arms = out / "arms"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(arms.glob("*.safetensors"))) < checkpoints:
        time.sleep(0.2)
    assert len(list(arms.glob("*.safetensors"))) == checkpoints, "the workers never checkpointed"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "anchoring resume" in err, err
    before = {p.name: p.stat().st_mtime_ns for p in arms.glob("*.safetensors")}
    time.sleep(1.5)  # a worker left running would keep writing checkpoints every few steps
    assert {p.name: p.stat().st_mtime_ns for p in arms.glob("*.safetensors")} == before


def child_pids(pid: int) -> set[int]:
    """The processes `pid` started and has not reaped (Linux), or nothing once it is gone."""
    try:
        return {int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()}
    except OSError:
        return set()


def assert_gone(pids: set[int]) -> None:
    """Every one of `pids` has exited (a zombie waiting for its reaper counts as exited)."""
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read().split()[2]
        except OSError:
            continue
        assert state == "Z", f"process {pid} is still running ({state})"
