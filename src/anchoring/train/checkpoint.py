"""Checkpoints as safetensors, written atomically; enough state to resume bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError

FORMAT = "anchoring-checkpoint-1"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    write_atomic(path, save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_checkpoint(path: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict[str, torch.Tensor]) -> None:
    tensors = {f"param.{k}": v for k, v in params.items()}
    for k, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ADAM_KEYS:
            if key in state:
                tensors[f"adam.{k}.{key}"] = state[key]
    tensors.update(extra)
    atomic_save(tensors, path, {"format": FORMAT, "step": str(step)})


def read_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise AnchoringError(f"cannot read checkpoint {str(path)!r}: {e}") from None
    if meta.get("format") != FORMAT:
        raise AnchoringError(f"{str(path)!r} is not an anchoring checkpoint")
    return int(meta["step"]), tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    for k, p in params.items():
        state = {key: tensors[f"adam.{k}.{key}"].clone() for key in ADAM_KEYS if f"adam.{k}.{key}" in tensors}
        if state:
            optimizer.state[p] = state
