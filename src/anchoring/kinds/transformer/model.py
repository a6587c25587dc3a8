"""Rebuilding the transformer arms of a run, and the run object users analyse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from anchoring.errors import AnchoringError
from anchoring.kinds.base import ArmsRun
from anchoring.kinds.transformer.config import TransformerExperiment
from anchoring.kinds.transformer.training import build_language, build_transformer
from anchoring.models import NormalizedTransformer
from anchoring.train.checkpoint import CHECKPOINT, verify


@dataclass
class TransformerRun(ArmsRun):
    """A transformer run: one model per (arm, seed); `models` lists them arm by arm."""

    @property
    def language(self):
        return build_language(self.config)

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids `(T,)` of a line of the colour language, e.g. '500 + 005 = 303 ;'."""
        return self.language.tokenize(text)

    @torch.no_grad()
    def logits(self, text: str, arm: str | None = None, seed: int | None = None) -> torch.Tensor:
        """Next-token logits `(T, vocab)` at every position of `text`."""
        tokens = self.tokenize(text)
        return self.model(arm, seed)(tokens[None])[0]

    @torch.no_grad()
    def loss_per_token(self, text: str, arm: str | None = None, seed: int | None = None) -> torch.Tensor:
        """Nats for every predicted token `(T − 1,)`: token t+1 given tokens ≤ t."""
        tokens = self.tokenize(text)
        logits = self.model(arm, seed)(tokens[None])[0]
        return F.cross_entropy(logits[:-1], tokens[1:], reduction="none")


def read_arms(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path / CHECKPOINT), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path / CHECKPOINT))
    except (OSError, SafetensorError) as e:
        raise AnchoringError(f"cannot read {str(path / CHECKPOINT)!r}: {e}") from None
    verify(path / CHECKPOINT, meta, tensors)
    return tensors


def open_run(path: Path, cfg: TransformerExperiment, arch: dict[str, Any], summary: dict[str, Any] | None) -> TransformerRun:
    for key in ("seeds", "arms"):
        if key not in arch:
            raise AnchoringError(f"{str(path / 'architecture.json')!r} has no {key!r} list")
    tensors = read_arms(path)
    lang = build_language(cfg)
    arms: dict[str, list[NormalizedTransformer]] = {}
    for arm in arch["arms"]:
        arms[arm] = []
        for seed in arch["seeds"]:
            m = build_transformer(cfg, lang)
            prefix = f"{arm}.{seed}."
            try:
                m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            except RuntimeError as e:
                raise AnchoringError(f"{str(path)!r}: weights of {arm} seed {seed} do not match the config ({str(e)[:80]})") from None
            m.eval()
            arms[arm].append(m)
    models = [m for ms in arms.values() for m in ms]
    return TransformerRun(path, cfg, list(arch["seeds"]), models, summary, arms)
