"""Rebuilding the arms of an LM run, and the run object users analyse (`load_run`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anchoring.errors import AnchoringError
from anchoring.kinds.arms import load_arms
from anchoring.kinds.base import ArmsRun
from anchoring.kinds.lm import evaluate as ev
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import TOKENIZER, LMData, load_data
from anchoring.kinds.lm.training import build_model


@dataclass
class LMRun(ArmsRun):
    """An LM run: one model per (arm, seed), its tokenizer and the measured anchor direction."""

    data: LMData | None = None

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids `(T,)` with the run's own tokenizer (saved in the run directory)."""
        return torch.from_numpy(np.asarray(self.data.encode(text), dtype=np.int64))

    def _warn_unknown(self, text: str) -> None:
        """Characters the model never saw are scored as the unknown token, so their numbers say nothing about
        them; the command line warns about them, and so does the API."""
        from anchoring.report.surprise_page import unknown_characters

        unseen = unknown_characters(self.data.tokenizer, text)
        if unseen:
            warnings.warn(f"the text has characters the model never saw in training, read as the unknown token: "
                          f"{unseen[:10]!r}", UserWarning, stacklevel=3)

    @torch.no_grad()
    def loss_per_token(self, texts: str | list[str], arm: str | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        """Per text: `nats` `(T − 1,)` for every predicted token (token t+1 given tokens ≤ t; a text
        longer than the model's context is scored in overlapping windows of `context` tokens, so every
        token after the first window has at least half a window before it), the predicted tokens' character `spans`, and `nats_per_char` over them.

        Each text is scored on its own, from its first token; the run's summary scores validation
        passages packed into windows, so its nats/char differ a little from these."""
        from anchoring.evaluate.surprise import score_ids

        model = self.model(arm, seed)
        out = []
        for text in [texts] if isinstance(texts, str) else texts:
            self._warn_unknown(text)
            ids = self.tokenize(text)
            spans = self.data.tokenizer.spans(text)
            if len(ids) < 2:
                out.append({"nats": torch.zeros(0), "spans": [], "nats_per_char": float("nan")})
                continue
            nats = score_ids(model, ids, context=model.context).surprisal[1:]
            chars = float(ev.chars_per_token(spans)[1:].sum())  # the predicted tokens' characters
            out.append({"nats": nats, "spans": spans[1:], "nats_per_char": float(nats.sum()) / max(chars, 1)})
        return out

    def alignment(self, texts: str | list[str], arm: str | None = None, seed: int | None = None,
                  site: str | None = None) -> list[dict[str, Any]]:
        """Per text: alignment with the anchor of the residual state at every token (`values`) and the
        tokens' character `spans`; `site` defaults to the first anchored layer."""
        from anchoring.kinds.lm.direction import anchored_sites, measured_direction

        direction, dims = measured_direction(self.config)
        site = (anchored_sites(self.config) or [f"blocks.{self.config.lm.layers - 1}"])[0] if site is None else site
        valid = ["embed", *[f"blocks.{i}" for i in range(self.config.lm.layers)]]
        if site not in valid:
            raise AnchoringError(f"site {site!r} is not a residual site of this model ({', '.join(valid)})")
        model = self.model(arm, seed)
        out = []
        for text in [texts] if isinstance(texts, str) else texts:
            self._warn_unknown(text)
            a, spans = ev.token_alignment(model, self.data, text, site, direction, dims)
            out.append({"values": torch.from_numpy(a), "spans": spans})
        return out

    @torch.no_grad()
    def generate(self, prompt: str, arm: str | None = None, n: int = 200, seed: int | None = None,
                 temperature: float = 0.8, sample_seed: int = 0, model: torch.nn.Module | None = None) -> str:
        """`prompt` continued by `n` sampled tokens (temperature 0: greedy); the last `context` tokens condition.
        `model` replaces the arm's model (an edited copy, say) with the same tokenizer and sampling seed."""
        if not prompt:
            raise AnchoringError("the prompt is empty: give at least one character to continue")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise AnchoringError(f"temperature must be a finite number ≥ 0, got {temperature}")
        if n < 1:
            raise AnchoringError(f"n (tokens to generate) must be ≥ 1, got {n}")
        model = model if model is not None else self.model(arm, seed)
        ids = self.tokenize(prompt).tolist()
        char_level = self.data.tokenizer.kind == "char"  # there id 0 stands for every character never seen in training
        if char_level and 0 in ids:
            unseen = sorted({c for c, i in zip(prompt, ids) if i == 0})
            raise AnchoringError(f"the prompt has characters the model never saw in training: {''.join(unseen[:10])!r}")
        g = torch.Generator().manual_seed(sample_seed)
        start = len(ids)
        for _ in range(n):
            logits = model(torch.tensor([ids[-model.context:]]))[0, -1]
            if char_level:
                logits[0] = float("-inf")  # never continue with "a character not in the vocabulary"
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                nxt = int(torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=g))
            ids.append(nxt)
        return prompt + self.data.tokenizer.decode(ids[start:])


def open_run(path: Path, cfg: LMExperiment, arch: dict[str, Any], summary: dict[str, Any] | None) -> LMRun:
    if "vocab" not in arch:
        raise AnchoringError(f"{str(path / 'architecture.json')!r} has no 'vocab'")
    if not (path / TOKENIZER).is_file():  # a tokenizer trained again might not be the one the weights read, and
        # opening a run must not write into it
        raise AnchoringError(f"{str(path / TOKENIZER)!r} is missing: the run's weights need the tokenizer they were "
                             f"trained with")
    data = load_data(cfg.text, path)
    if data.vocab_size != arch["vocab"]:
        raise AnchoringError(f"{str(path)!r}: tokenizer has {data.vocab_size} tokens, the weights {arch['vocab']}")
    out = load_arms(path, arch, lambda arm: build_model(cfg, arch["vocab"], arm))
    return LMRun(path, cfg, list(arch["seeds"]), [m for ms in out.values() for m in ms], summary, out, data)
