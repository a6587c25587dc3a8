"""Distilling an edited model into a fresh (or partly noised) copy of itself, after Lee et al. 2025
("Distillation robustifies unlearning", the UNDO method): the student learns only what the edited
teacher still outputs, so whatever the edit left latent in the teacher's weights, and a relearning
attack could wake, is not copied. The price is a training run's worth of steps.

The anchored deletion is the edit distilled here (`unlearning.distil_steps`); the same distillation
of the unedited anchored model is its control (see docs/method.md, "Unlearning").
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from anchoring.control.relearn import finetune

INIT_SEED = 1000  # the fresh model of seed s is drawn from torch.manual_seed(INIT_SEED + s), apart from the global RNG
START = 1e-4  # the rate the warm-up starts from, as in the shipped training schedules


def fresh_model(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A newly initialised model for seed `seed`, the same on every call, without moving the CPU's global
    RNG (which the caller's other methods and fine-tunes may draw from; the evaluation runs on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED + seed)
        return build()


def noised(model: nn.Module, fresh: nn.Module, alpha: float) -> nn.Module:
    """A copy of `model` with every parameter moved a share `alpha` of the way to `fresh`'s (1: `fresh`
    itself), then put back on the sphere: UNDO's noise, which sets how much of the teacher's weights,
    and of what they hide, the student starts from."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(out.parameters(), fresh.parameters(), strict=True):
            p.copy_((1 - alpha) * p + alpha * q)
        if hasattr(out, "normalize_weights"):
            out.normalize_weights()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def rate(step: int, steps: int, lr: float) -> float:
    """The share of the peak rate `lr` at `step` of `steps`: a linear warm-up over the first 5% from 1e-4
    (or from `lr` when that is lower), flat to 80%, then down towards a tenth (0.1 + 4.5/steps at the
    last step). Why: the shipped LM schedules train this way, and a student trained from scratch at a
    constant rate ends visibly short of its teacher in the same steps."""
    f = step / steps
    start = min(1.0, START / lr)
    if f < 0.05:
        return start + (1 - start) * f / 0.05
    if f < 0.8:
        return 1.0
    return 1 - 0.9 * (f - 0.8) / 0.2


def distillation_loss(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, mean over positions: the student is told
    only what the teacher outputs, never the text's own next token."""
    with torch.no_grad():
        target = F.log_softmax(teacher(x), -1).flatten(0, 1)
    return F.kl_div(F.log_softmax(student(x), -1).flatten(0, 1), target, log_target=True, reduction="batchmean")


def distilled(teacher: nn.Module, student: nn.Module, batches: Callable[[int], torch.Tensor], steps: int, lr: float,
              tick: Callable[[], None] | None = None) -> nn.Module:
    """`student` (a copy: `noised`) trained for `steps` Adam steps to match `teacher` on the windows
    `batches(step)` gives (their last token is not an input), at peak rate `lr` shaped by `rate`; the
    teacher is left as it was. A loss or weights that stop being finite raise `Diverged`."""
    teacher = teacher.eval()
    out: list[nn.Module] = []
    finetune(student, lambda m, step: distillation_loss(m, teacher, batches(step)[:, :-1]),
             lambda m: out.append(m) or {}, steps, lr, tick=tick, rate=lambda step: rate(step, steps, lr))
    return out[-1].eval()
