"""One shard of a sweep: train a config's seeds to the end, leaving the kind's final checkpoint(s).

A shard trains in its own directory with regular checkpoints, so a retried shard resumes
where its dead predecessor stopped; results are the same either way because batches are a
pure function of (seed, step). What a shard trains and which files it leaves is up to its
kind (`Kind.train_shard`, `Kind.shard_files`, found through `kinds.kind_of`).
`python -m anchoring.sweep.worker SHARD_DIR` is the process entry point of the local backend;
`shard_payload` is the Ray task body.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import torch

from anchoring.atomic import write_atomic
from anchoring.experiments import load_config
from anchoring.kinds import kind_of
from anchoring.sweep.layout import DIVERGED_EXIT, DONE, SHARD_CONFIG
from anchoring.train.skeleton import Diverged

# testing aid for the local backend: kill the first attempt of every shard at this step (its marker lives in the
# shard directory; a Ray task trains in fresh scratch space, where every attempt would be the first)
FAULT_ENV = "ANCHORING_SWEEP_FAULT_STEP"


def _fault_callback(shard_dir: Path):
    """SIGKILL this process once per shard at the configured step (of the first model the shard
    trains), to prove retries lose nothing."""
    at = os.environ.get(FAULT_ENV)
    marker = shard_dir / "fault-injected"
    if at is None or marker.exists():
        return []

    def cb(step: int) -> None:
        if step + 1 == int(at):
            marker.write_text("killed\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return [cb]


def run_shard(shard_dir: Path) -> None:
    """Train (or resume) the shard in `shard_dir`; write `done` last."""
    torch.set_num_threads(1)
    if (shard_dir / DONE).is_file():
        return
    cfg = load_config(shard_dir / SHARD_CONFIG)
    kind_of(cfg).train_shard(cfg, shard_dir, callbacks=_fault_callback(shard_dir))  # resumes from its checkpoints
    write_atomic(shard_dir / DONE, "ok\n")


def shard_payload(config_toml: str) -> dict[str, bytes]:
    """Ray task body: train a shard in scratch space and return its result files' bytes, by path
    relative to the shard directory.

    Returning the bytes (rather than writing to a shared path) lets the driver collect shards
    from any node of a cluster.
    """
    with tempfile.TemporaryDirectory(prefix="anchoring-shard-") as tmp:
        d = Path(tmp)
        (d / SHARD_CONFIG).write_text(config_toml)
        run_shard(d)
        cfg = load_config(d / SHARD_CONFIG)
        return {str(rel): (d / rel).read_bytes() for rel in kind_of(cfg).shard_files(cfg, d)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m anchoring.sweep.worker SHARD_DIR (a shard directory written by `anchoring sweep`)")
    try:
        run_shard(Path(sys.argv[1]))
    except Diverged as e:  # the same step diverges again on every attempt: said so, and not retried
        print(f"diverged: {e}", file=sys.stderr, flush=True)
        sys.exit(DIVERGED_EXIT)
