"""Kinds that train several arms per seed (transformer, language model): their (arm, seed) jobs run one
after another, and their weights go into one checkpoint file with every (arm, seed) model under
`<arm>.<seed>.<parameter>`, checksummed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from anchoring.errors import AnchoringError
from anchoring.resources import release_freed_memory
from anchoring.train.checkpoint import CHECKPOINT, atomic_save, verify
from anchoring.train.skeleton import TrainingInterrupted

R = TypeVar("R")
Job = tuple[str, int]


def train_each(jobs: list[Job], steps: int, train: Callable[[str, int, Callable[[int], None] | None], R],
               progress: Callable[[int, int], None] | None, path: Path, here: bool = True) -> dict[Job, R]:
    """`train(arm, seed, report)` for every job, one after another in this process; a job that worker
    processes or data-parallel ranks already finished only loads its checkpoint there. With `here` (no
    other process reported the steps), each job's steps reach `progress` after those of the jobs
    before it. A stop names the run's directory, so that the command can say how to resume it."""
    total = steps * len(jobs)
    results: dict[Job, R] = {}
    for i, (arm, seed) in enumerate(jobs):
        report = (lambda s, done=i * steps: progress(done + s, total)) if progress and here else None
        try:
            results[arm, seed] = train(arm, seed, report)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(e.step, path) from None
        release_freed_memory()  # or the process grows by each job's freed activations and optimiser state
    return results


def refuse_repeated_seeds(seeds: list[int]) -> None:
    """Each (arm, seed) model is stored and opened under its seed: a seed listed twice trained two jobs
    into one name, and `load_run` gave the same model twice."""
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise AnchoringError(f"train.seed_list repeats seed {', '.join(map(str, repeated))}: every seed trains one model "
                             f"per arm, stored under the seed, so list each seed once")


def write_arms(path: Path, models: dict[tuple[str, int], nn.Module], fmt: str) -> None:
    atomic_save({f"{arm}.{seed}.{k}": v.detach().cpu() for (arm, seed), m in models.items() for k, v in m.state_dict().items()},
                path / CHECKPOINT, {"format": fmt})


def read_arms(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path / CHECKPOINT), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path / CHECKPOINT))
    except (OSError, SafetensorError) as e:
        raise AnchoringError(f"cannot read {str(path / CHECKPOINT)!r}: {e}") from None
    verify(path / CHECKPOINT, meta, tensors)
    return tensors


def load_arms(path: Path, arch: dict, build: Callable[[str], nn.Module]) -> dict[str, list[nn.Module]]:
    """Every arm's models, seed by seed, rebuilt with `build(arm)` (arms may differ in shape) and
    filled from the checkpoint."""
    for key in ("seeds", "arms"):
        if key not in arch:
            raise AnchoringError(f"{str(path / 'architecture.json')!r} has no {key!r} list")
    tensors = read_arms(path)
    out: dict[str, list[nn.Module]] = {}
    for arm in arch["arms"]:
        out[arm] = []
        for seed in arch["seeds"]:
            m = build(arm)
            prefix = f"{arm}.{seed}."
            try:
                m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            except RuntimeError as e:
                raise AnchoringError(f"{str(path)!r}: weights of {arm} seed {seed} do not match the config ({_first_mismatch(e)})") from None
            m.eval()
            out[arm].append(m)
    return out


def _first_mismatch(e: Exception) -> str:
    """The first specific line of torch's multi-line load_state_dict error ("size mismatch for x: …")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    specific = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (specific or lines or [type(e).__name__])[0][:160]
