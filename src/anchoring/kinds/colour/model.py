"""Rebuilding colour autoencoders from a run directory, and the run object users analyse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anchoring.errors import AnchoringError
from anchoring.kinds.base import Run
from anchoring.kinds.colour.config import ColourExperiment
from anchoring.models import ColourAutoencoder
from anchoring.train.checkpoint import read_checkpoint

ARCH_KIND = "colour-autoencoder"


def architecture(cfg: ColourExperiment) -> dict[str, Any]:
    return {"kind": ARCH_KIND, **cfg.model.model_dump(mode="json"), "seeds": cfg.train.member_seeds()}


def model_from_architecture(arch: dict[str, Any]) -> nn.Module:
    try:
        return ColourAutoencoder(arch["latent_dim"], tuple(arch["hidden"]), arch["normalize"], arch["output"])
    except (KeyError, TypeError) as e:
        raise AnchoringError(f"architecture.json is missing {e} (or has the wrong type)") from None


@dataclass
class ColourRun(Run):
    """A colour run: one autoencoder per seed, with batched encode / decode helpers."""

    @torch.no_grad()
    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """Normalised latents `(seeds, ..., E)` for RGB `(..., 3)`."""
        _check_rgb("encode", rgb)
        return torch.stack([m.encode(rgb) for m in self.models])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """RGB `(seeds, ..., 3)` from latents `(seeds, ..., E)` (each seed decodes its own slice)."""
        if z.shape[0] != len(self.models):
            raise AnchoringError(f"decode expects latents shaped (seeds={len(self.models)}, ..., E), got {tuple(z.shape)}")
        return torch.stack([m.decode(zi) for m, zi in zip(self.models, z)])

    @torch.no_grad()
    def reconstruct(self, rgb: torch.Tensor) -> torch.Tensor:
        _check_rgb("reconstruct", rgb)
        return torch.stack([m(rgb) for m in self.models])

    @property
    def latent_dim(self) -> int:
        return int(getattr(self.models[0], "latent_dim", self.config.model.latent_dim))


def open_run(path: Path, cfg: ColourExperiment, arch: dict[str, Any], summary: dict[str, Any] | None) -> ColourRun:
    """Models from `checkpoint.safetensors` (stacked along seeds) in the shape `arch` gives."""
    _, tensors = read_checkpoint(path / "checkpoint.safetensors")
    if "seeds" not in arch:
        raise AnchoringError(f"{str(path / 'architecture.json')!r} has no 'seeds' list")
    seeds = list(arch["seeds"])
    models = []
    for i in range(len(seeds)):
        m = model_from_architecture(arch)
        try:
            m.load_state_dict({k: tensors[f"param.{k}"][i] for k in m.state_dict()})
        except (KeyError, RuntimeError, IndexError) as e:
            raise AnchoringError(f"{str(path)!r}: checkpoint does not match its config ({type(e).__name__})") from None
        m.eval()
        models.append(m)
    return ColourRun(path, cfg, seeds, models, summary)


def _check_rgb(what: str, rgb: torch.Tensor) -> None:
    """One line for a batch that is not colours, instead of a matrix-shape error from inside the encoder."""
    if not isinstance(rgb, torch.Tensor) or rgb.ndim < 1 or rgb.shape[-1] != 3:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise AnchoringError(f"{what} expects RGB colours shaped (..., 3), got {shape}")
