"""Rebuilding the transformer arms of a run, and the run object users analyse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from anchoring.kinds.arms import load_arms
from anchoring.kinds.base import ArmsRun
from anchoring.kinds.transformer.config import TransformerExperiment
from anchoring.kinds.transformer.training import build_language, build_transformer


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


def open_run(path: Path, cfg: TransformerExperiment, arch: dict[str, Any], summary: dict[str, Any] | None) -> TransformerRun:
    lang = build_language(cfg)
    arms = load_arms(path, arch, lambda _arm: build_transformer(cfg, lang))
    models = [m for ms in arms.values() for m in ms]
    return TransformerRun(path, cfg, list(arch["seeds"]), models, summary, arms)
