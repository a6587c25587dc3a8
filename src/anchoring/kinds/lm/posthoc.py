"""Post-hoc concept directions for the LM unlearning comparison, fitted on the control arm.

For each seed, the control model reads training windows from its own batch stream (`Stream` of that
seed, steps 0, 1, … until `fit_positions` positions are collected, then a seeded subset of them);
its residual state at every anchored site is captured, and each position carries the weak label
the anchored arm trained with: its passage's, or, with `text.weak_labels = "spans"`, its span's.
Per site:

- *mean-difference*: the unit vector from the mean of unlabelled to the mean of labelled states; its
  suppress hook removes h·v beyond the midpoint of the two class means (`beyond_midpoint`);
- *LEACE*: the least-squares concept eraser (`control.erasure.leace`), plus the direction it moves
  states along (top singular vector of x − erase(x) over the fitted states; rank one for one label).

Suppress hooks every site: mean-difference by half-space suppression beyond the class midpoint,
LEACE by the eraser itself. Delete removes the directions from the
embeddings and every residual writer (`edits.delete`, orthonormalised over sites); for LEACE that
removes the eraser's range only, so only the hook is exact LEACE. Blind makes every residual reader
after the first fitted site blind to the same directions (`edits.blind`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from anchoring.anchor import Capture
from anchoring.control.erasure import leace, mean_difference
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import LMData, Stream
from anchoring.kinds.lm.edits import edited

FIT_SALT = 0xF17
MAX_BATCHES = 64


@dataclass
class PosthocFit:
    method: str  # mean-difference | leace
    sites: list[str]
    directions: dict[str, torch.Tensor]  # unit vector per site
    erasers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def suppress(self, model: nn.Module, cfg: LMExperiment) -> nn.Module:
        return edited(model, cfg, "suppress", directions={s: [v] for s, v in self.directions.items()}, sites=self.sites,
                      edits=self.erasers or None)

    def delete(self, model: nn.Module, cfg: LMExperiment) -> nn.Module:
        return edited(model, cfg, "delete", directions=[self.directions[s] for s in self.sites])

    def blind(self, model: nn.Module, cfg: LMExperiment) -> nn.Module:
        return edited(model, cfg, "blind", directions=[self.directions[s] for s in self.sites], sites=self.sites)


@torch.no_grad()
def fit_activations(model: nn.Module, cfg: LMExperiment, data: LMData, seed: int, sites: list[str],
                    positions: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Residual states `(positions, D)` per site from the control stream of `seed`, and each position's
    weak 0/1 label (`Batch.labels`: its passage's, or its span's)."""
    stream = Stream(data.train_tokens, data.keep("control", seed), seed, cfg.lm.tokens, data.span_masks())
    weak = data.weak(seed)
    acts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    labels: list[torch.Tensor] = []
    n = 0
    model.eval()
    with Capture(model, sites) as cap:
        for step in range(MAX_BATCHES):
            b = stream.batch(step, cfg.lm.batch_size, weak)
            model(b.inputs)
            for s in sites:
                acts[s].append(cap.acts[s].reshape(-1, cap.acts[s].shape[-1]).float())
            labels.append(b.labels.flatten())
            n += labels[-1].numel()
            got = torch.cat(labels)
            if n >= positions and 0 < got.sum() < len(got):
                break
    y = torch.cat(labels)
    if y.sum() == 0 or y.sum() == len(y):
        raise AnchoringError(f"seed {seed}: the {n} training positions read for the post-hoc fit are all "
                             f"{'labelled' if y.sum() else 'unlabelled'}; raise unlearning.fit_positions")
    pick = np.sort(np.random.default_rng([seed, FIT_SALT]).choice(len(y), min(positions, len(y)), replace=False))
    idx = torch.from_numpy(pick)
    if y[idx].sum() in (0, len(idx)):  # the subset lost one class: keep every position read
        idx = torch.arange(len(y))
    return {s: torch.cat(a)[idx] for s, a in acts.items()}, y[idx]


def beyond_midpoint(acts: torch.Tensor, labels: torch.Tensor, v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Half-space suppression for a direction that was not trained to mean "concept = positive":
    remove only the part of h·v beyond the midpoint c of the two class means along v,
    h ← h − max(0, h·v − c)·v. (The anchored arm's suppress thresholds at 0, because anchoring put
    the concept on the positive side; a control's states sit wherever training left them, so a
    threshold at 0 could hit almost every position or almost none.)"""
    lab = labels.bool()
    proj = acts.float() @ v.float()
    c = 0.5 * (float(proj[lab].mean()) + float(proj[~lab].mean()))

    def edit(h: torch.Tensor) -> torch.Tensor:
        u = v.to(h.dtype)
        return h - torch.relu(h @ u - c).unsqueeze(-1) * u

    return edit


def range_direction(acts: torch.Tensor, erase: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The unit direction an eraser moves points along: top right singular vector of x − erase(x)
    (its sign is arbitrary; deleting a direction does not depend on it)."""
    delta = (acts - erase(acts)).double()
    _, _, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[0].float()


def fit(model: nn.Module, cfg: LMExperiment, data: LMData, seed: int, sites: list[str]) -> dict[str, PosthocFit]:
    """Every configured post-hoc method, fitted on `model` (the control arm of `seed`) at `sites`."""
    acts, y = fit_activations(model, cfg, data, seed, sites, cfg.unlearning.fit_positions)
    out: dict[str, PosthocFit] = {}
    for method in cfg.unlearning.posthoc:
        if method == "mean-difference":
            dirs = {s: mean_difference(acts[s], y) for s in sites}
            out[method] = PosthocFit(method, sites, dirs, {s: beyond_midpoint(acts[s], y, dirs[s]) for s in sites})
        else:
            erasers = {s: leace(acts[s], y) for s in sites}
            out[method] = PosthocFit(method, sites, {s: range_direction(acts[s], erasers[s]) for s in sites}, erasers)
    return out
