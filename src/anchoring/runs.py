"""Run directories: every file written atomically; `load_run` reads one back for analysis.

Layout: config.toml (resolved, re-runnable), architecture.json, checkpoint.safetensors
(stacked weights + optimiser state), metrics.csv (per step, per seed), snapshots.safetensors
(latents over training), figures/*.png, report.html, summary.json (written last: its presence
marks a finished run).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anchoring.atomic import write_atomic
from anchoring.config import ExperimentConfig, load_config
from anchoring.errors import AnchoringError
from anchoring.models import ColourAutoencoder
from anchoring.train.checkpoint import read_checkpoint

CONFIG, ARCH, SUMMARY, METRICS, SNAPSHOTS, REPORT = (
    "config.toml", "architecture.json", "summary.json", "metrics.csv", "snapshots.safetensors", "report.html")


def new_run_dir(cfg: ExperimentConfig, out: Path | None, root: Path = Path("runs")) -> Path:
    """Pick (but do not create) the run directory; refuse to overwrite an existing run."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = root / cfg.name / stamp
        n = 1
        while out.exists():
            n += 1
            out = root / cfg.name / f"{stamp}-{n}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AnchoringError(f"{str(out)!r} already exists and is not empty (choose another --out, or `anchoring resume` it)")
    return out


def architecture(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"kind": "colour-autoencoder", **cfg.model.model_dump(mode="json"), "seeds": cfg.train.member_seeds()}


def model_from_architecture(arch: dict[str, Any]) -> nn.Module:
    if arch.get("kind") != "colour-autoencoder":
        raise AnchoringError(f"unknown architecture kind {arch.get('kind')!r}")
    return ColourAutoencoder(arch["latent_dim"], tuple(arch["hidden"]), arch["normalize"], arch["output"])


def write_metrics_csv(path: Path, header: list[str], rows) -> None:
    """Step and seed as integers, every other column to 8 significant digits (nan stays nan)."""
    rows = np.asarray(rows, dtype=np.float64)
    buf = io.StringIO()
    buf.write(",".join(header) + "\n")
    np.savetxt(buf, rows, fmt=["%d", "%d", *["%.8g"] * (rows.shape[1] - 2)], delimiter=",")
    write_atomic(path, buf.getvalue())


@dataclass
class Run:
    """A finished (or checkpointed) run: its config, one model per seed, and its summary."""

    path: Path
    config: ExperimentConfig
    seeds: list[int]
    models: list[nn.Module]
    summary: dict[str, Any] | None = field(default=None)

    @torch.no_grad()
    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """Normalised latents `(seeds, ..., E)` for RGB `(..., 3)`."""
        return torch.stack([m.encode(rgb) for m in self.models])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """RGB `(seeds, ..., 3)` from latents `(seeds, ..., E)` (each seed decodes its own slice)."""
        if z.shape[0] != len(self.models):
            raise AnchoringError(f"decode expects latents shaped (seeds={len(self.models)}, ..., E), got {tuple(z.shape)}")
        return torch.stack([m.decode(zi) for m, zi in zip(self.models, z)])

    @torch.no_grad()
    def reconstruct(self, rgb: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(rgb) for m in self.models])

    def metrics(self) -> dict[str, list[float]]:
        """metrics.csv as columns (step, seed, schedule values, losses)."""
        p = self.path / METRICS
        if not p.is_file():
            raise AnchoringError(f"{str(self.path)!r} has no {METRICS}")
        with p.open() as f:
            rows = list(csv.reader(f))
        return {name: [float(r[i]) for r in rows[1:]] for i, name in enumerate(rows[0])}


def load_run(path: str | Path) -> Run:
    """Open a run directory written by `anchoring run` (or `delete`): config, weights, summary."""
    p = Path(path)
    if not p.is_dir():
        raise AnchoringError(f"{str(p)!r} is not a run directory")
    if not (p / CONFIG).is_file() or not (p / "checkpoint.safetensors").is_file():
        raise AnchoringError(f"{str(p)!r} is not a readable run (needs {CONFIG} and checkpoint.safetensors)")
    cfg = load_config(p / CONFIG)
    _, tensors = read_checkpoint(p / "checkpoint.safetensors")
    arch = architecture(cfg)
    if (p / ARCH).is_file():  # the weights' true shape (an edited run may differ from its config)
        try:
            arch = json.loads((p / ARCH).read_text())
        except json.JSONDecodeError:
            raise AnchoringError(f"{str(p / ARCH)!r} is not valid JSON") from None
    seeds = list(arch["seeds"])
    models = []
    for i in range(len(seeds)):
        m = model_from_architecture(arch)
        try:
            m.load_state_dict({k: tensors[f"param.{k}"][i] for k in m.state_dict()})
        except (KeyError, RuntimeError, IndexError) as e:
            raise AnchoringError(f"{str(p)!r}: checkpoint does not match its config ({type(e).__name__})") from None
        m.eval()
        models.append(m)
    summary = json.loads((p / SUMMARY).read_text()) if (p / SUMMARY).is_file() else None
    return Run(p, cfg, seeds, models, summary)
