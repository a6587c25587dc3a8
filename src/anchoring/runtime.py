"""Process-wide settings every entry point shares (CLI, benchmark cases, sweep workers)."""

from __future__ import annotations

import os


def default_threads() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: the colour models' ops are tiny,
    and one thread beats several (no OpenMP hand-off per op; 2 threads were ~2× slower here)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def launched_by_torchrun() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several started by `torchrun`, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
