"""Checkpoints as safetensors, written atomically; enough state to resume bit for bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError

FORMAT = "anchoring-checkpoint-1"
CHECKPOINT = "checkpoint.safetensors"  # a run's (final or latest) weights, in every kind
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: a checkpoint that
    was truncated, bit-flipped or hand-edited no longer matches the value stored inside it."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def meta_checksum(meta: dict[str, str]) -> str:
    """SHA-256 over the header's own entries (the step a resume starts from, the format), which the
    tensors' checksum does not cover: a flipped bit in `step` resumed the weights at the wrong step."""
    h = hashlib.sha256()
    for k in sorted(k for k in meta if k not in ("sha256", "meta_sha256")):
        h.update(f"{k}={meta[k]}\n".encode())
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors with checksums of the tensors and of the header, written atomically: a crash leaves
    the previous checkpoint, and a damaged file is refused on reading instead of resuming wrong."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomic(path, save(tensors, metadata={**metadata, "sha256": checksum(tensors), "meta_sha256": meta_checksum(metadata)}))


def verify(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose contents or header do not match their stored checksums (checkpoints
    written before the header had one are checked on their tensors only)."""
    if ("sha256" in meta and checksum(tensors) != meta["sha256"]) or (
            "meta_sha256" in meta and meta_checksum(meta) != meta["meta_sha256"]):
        raise AnchoringError(f"checkpoint {str(path)!r} is corrupt (its checksum does not match); "
                             f"restore it or start the run again")


def save_checkpoint(path: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict[str, torch.Tensor]) -> None:
    """Weights, Adam's moments and the task's `extra` state at `step`: everything a resume needs to
    continue bit for bit as if never stopped."""
    tensors = {f"param.{k}": v for k, v in params.items()}
    for k, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ADAM_KEYS:
            if key in state:
                tensors[f"adam.{k}.{key}"] = state[key]
    tensors.update(extra)
    atomic_save(tensors, path, {"format": FORMAT, "step": str(step)})


def read_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, tensors) of a checkpoint `save_checkpoint` wrote, checked against its checksums; any
    other file is one clear error rather than a resume from the wrong state."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise AnchoringError(f"cannot read checkpoint {str(path)!r}: {e}") from None
    if meta.get("format") != FORMAT:
        raise AnchoringError(f"{str(path)!r} is not an anchoring checkpoint")
    verify(path, meta, tensors)
    return int(meta["step"]), tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Put the saved Adam state back, on the devices Adam keeps it on: the moments beside their
    parameter (a checkpoint is read onto the CPU, the model may train on a GPU), the step count
    there too for fused or capturable Adam and on the CPU otherwise."""
    on_device = {id(p): bool(g.get("fused") or g.get("capturable")) for g in optimizer.param_groups for p in g["params"]}
    for k, p in params.items():
        state = {key: tensors[f"adam.{k}.{key}"].to(p.device, copy=True) if key != "step" or on_device.get(id(p))
                 else tensors[f"adam.{k}.{key}"].clone() for key in ADAM_KEYS if f"adam.{k}.{key}" in tensors}
        if state:
            optimizer.state[p] = state


def concat_members(paths: list[Path], out: Path) -> None:
    """Concatenate ensemble checkpoints (same config, disjoint seeds) along the member axis, in the
    order given: what training all their seeds as one ensemble would have saved."""
    loaded = [read_checkpoint(p) for p in paths]
    steps = {s for s, _ in loaded}
    if len(steps) != 1:
        raise AnchoringError(f"shards stopped at different steps {sorted(steps)}")
    parts = [t for _, t in loaded]
    merged: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        if key == "metrics":
            merged[key] = torch.cat(vals, dim=1)  # (steps, members, metrics)
        elif key.endswith(".step"):
            merged[key] = vals[0]  # Adam's step count is shared by all members
        else:
            merged[key] = torch.cat(vals, dim=0)  # params, Adam moments, snapshots: (members, ...)
    atomic_save(merged, out, {"format": FORMAT, "step": str(steps.pop())})


def steps_done(path: Path) -> int:
    """How many steps the checkpoint at `path` holds (0 when there is none), from its metadata only."""
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("step", 0))
    except (OSError, SafetensorError, ValueError) as e:
        raise AnchoringError(f"cannot read checkpoint {str(path)!r}: {e}") from None
