"""Data-parallel training of an LM run on one machine: `lm.nproc` processes (gloo, CPU or CUDA).

How work maps onto ranks: the (arm, seed) jobs run one after another, and *every* job is split
over all ranks — rank r takes rows r·B/N … (r+1)·B/N − 1 of each step's global batch of B windows,
gradients are averaged over ranks before the (identical) optimiser step, and the concept terms use
the *global* count of labelled passages (or positions) as their denominator. So N processes train
the same model as one process taking the whole batch, up to the order of floating-point sums.
Every rank keeps its own checkpoint (`arms/<arm>-seed<s>.rank<r>.safetensors`; rank 0 without the
suffix), so an interrupted data-parallel run resumes with the same number of processes; the parent
then loads rank 0's finished checkpoint and evaluates as usual.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment


def _rank_main(rank: int, world: int, store: str, cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]]) -> None:
    import torch.distributed as dist

    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.kind import checkpoint_path
    from anchoring.kinds.lm.training import train_arm

    torch.set_num_threads(1)
    # ranks meet through a file, not a TCP port: no race with other processes for a free port
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = load_data(cfg.text, path)
        for arm, seed in jobs:
            train_arm(cfg, data, seed, arm, checkpoint=checkpoint_path(path, arm, seed), rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def train_data_parallel(cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]], world: int) -> None:
    """Train every job with `world` data-parallel processes; returns when all checkpoints are final."""
    import torch.multiprocessing as tmp

    if cfg.lm.batch_size % world:
        raise AnchoringError(f"lm.batch_size {cfg.lm.batch_size} does not split over lm.nproc = {world} processes")
    try:
        with tempfile.TemporaryDirectory(prefix="anchoring-ddp-") as meet:
            tmp.spawn(_rank_main, args=(world, os.path.join(meet, "store"), cfg, path, jobs), nprocs=world, join=True)
    except tmp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else "a rank failed"
        raise AnchoringError(f"data-parallel training failed: {last}") from None
