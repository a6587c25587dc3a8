"""Relearning attack: does a deleted concept come back after a little fine-tuning?

Fine-tune an edited model on samples of the concept (plus optional retain data) and record
its score after every step. The task's loss and score come from the caller, so this knows no
model and no data: each kind draws its own attack (colour: `kinds/colour/plan.py`; LM:
`kinds/lm/unlearning.py`).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from anchoring.train.skeleton import Diverged


@dataclass
class Curve:
    """A relearning attack's error per step, and when it fell back under a threshold."""

    errors: torch.Tensor  # (steps + 1,), error on the concept's colours before each step and after the last

    def steps_to(self, threshold: float) -> int | None:
        hit = (self.errors <= threshold).nonzero()
        return int(hit[0]) if len(hit) else None


T = TypeVar("T")


def finetune(model: nn.Module, loss: Callable[[nn.Module, int], torch.Tensor], score: Callable[[nn.Module], T],
             steps: int, lr: float, *, stop: Callable[[T], bool] | None = None,
             keep: Callable[[nn.Module], Any] | None = None, tick: Callable[[], None] | None = None,
             rate: Callable[[int], float] | None = None) -> list[T]:
    """Adam on a copy of `model` with `loss(model, step)`; `score` (in eval mode, no gradients)
    before the first step and after each: steps + 1 points, fewer when `stop` says so. `rate(step)`
    scales `lr` at each step (a schedule; constant without it). Weights go
    back on the sphere after each step when the model keeps them there (`normalize_weights`), then
    `keep` (in place) constrains them. Any model and task: the caller says what is learned and scored.

    A loss, weights or score that stop being finite raise `Diverged`, which carries the curve up to there
    (`.curve`, every point finite): scored on, the weights would be broken, and an attack that broke
    would pass for a deletion that held; the caller decides whether the cut curve means anything."""
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    curve = [_scored(m, score)]
    for step in range(steps):
        if stop is not None and stop(curve[-1]):
            break
        m.train()  # trained as in training, scored as it would be used (dropout off, statistics frozen)
        if rate is not None:
            for group in opt.param_groups:
                group["lr"] = lr * rate(step)
        value = loss(m, step)
        if not bool(torch.isfinite(value.detach()).all()):
            raise _diverged(f"fine-tuning diverged at step {step} of {steps} (lr {lr:g}): the loss is not finite", curve)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        with torch.no_grad():
            if hasattr(m, "normalize_weights"):
                m.normalize_weights()
            if keep is not None:
                keep(m)
            if not bool(torch.stack([torch.isfinite(w).all() for w in m.parameters()]).all()):  # one device sync
                raise _diverged(f"fine-tuning diverged at step {step} of {steps} (lr {lr:g}): the weights are not finite",
                                curve)
        scored = _scored(m, score)
        if not _all_finite(scored):  # finite weights can still be large enough to overflow what they compute
            raise _diverged(f"fine-tuning diverged at step {step} of {steps} (lr {lr:g}): its score is not finite", curve)
        curve.append(scored)
        if tick is not None:
            tick()
    return curve


def _all_finite(x: Any) -> bool:
    """Whether every number in a score (a tensor, a float, or a dict or list of them) is finite."""
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    return True


def _diverged(message: str, curve: list) -> Diverged:
    err = Diverged(message)
    err.curve = curve  # type: ignore[attr-defined]
    return err


@contextmanager
def diverging(what: str, fix: str) -> Iterator[None]:
    """A fine-tune's divergence named by the attack or repair it ended, with what to change: the
    step alone would not say which of a command's many fine-tunes broke."""
    try:
        yield
    except Diverged as e:
        raise Diverged(f"{what}: {e}; {fix}") from None


def _scored(m: nn.Module, score: Callable[[nn.Module], T]) -> T:
    m.eval()
    with torch.no_grad():
        return score(m)


def relearn(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], error: Callable[[nn.Module], torch.Tensor],
            steps: int, lr: float = 0.01) -> Curve:
    """Fine-tune a copy with Adam on `loss(model)` (full batch); `error(model)` measured before each
    step and after the last."""
    return Curve(torch.stack(finetune(model, lambda m, _step: loss(m), lambda m: error(m).detach(), steps, lr)))
