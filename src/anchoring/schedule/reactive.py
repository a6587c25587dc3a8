"""Reactive parameters: move a schedule track in response to a training metric.

Every `every` steps the controller looks at the metric's recent median over seeds (mean
over the window, skipping exact zeros, which sparse concept terms produce on unlabelled
batches). If the metric is on the wrong side of its target, the parameter is re-targeted
by `factor` (clamped to bounds) over `ease` steps; with `relax`, a satisfied metric lets
the parameter fall back by the same factor. Re-targeting keeps value and velocity
continuous (see `Track.retarget`). An ease ends before the next PHASE row, so a phase's keys
(a Tail that turns a term off) still land on their step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from anchoring.schedule.timeline import Timeline


@dataclass
class Decision:
    param: str
    at: int
    value: float
    until: int


@dataclass
class Reactive:
    param: str
    metric: str
    target: float
    every: int = 100
    factor: float = 1.5
    keep: str = "below"  # keep the metric below (or above) the target
    lowest: float = 0.0
    highest: float = float("inf")
    ease: int = 50
    relax: bool = False

    def window_value(self, history: torch.Tensor) -> float | None:
        """`history` is the metric over the last window, `(steps, seeds)`."""
        per_seed = []
        for col in history.T:
            live = col[(col != 0) & torch.isfinite(col)]
            if len(live):
                per_seed.append(live.mean())
        return float(np.median(torch.stack(per_seed).numpy())) if per_seed else None  # the project's one median

    def decide(self, step: int, history: torch.Tensor, timeline: Timeline) -> Decision | None:
        if step == 0 or step % self.every:
            return None
        value = self.window_value(history)
        if value is None:
            return None
        current = timeline.tracks[self.param](step)
        violated = value > self.target if self.keep == "below" else value < self.target
        # raise on a violation, lower when relaxing, never the other way: a weight that a dopesheet
        # put above `highest` (or below `lowest`) is left where it is, not pulled to the bound
        if violated:
            goal = min(max(current * self.factor, self.lowest if self.lowest > 0 else 1e-12), self.highest)
            if goal <= current:
                return None
        elif self.relax:
            goal = max(current / self.factor, self.lowest)
            if goal >= current:
                return None
        else:
            return None
        until = min(step + self.ease, timeline.steps - 1)
        # a decision does not ease across a PHASE row: keys inside the ease are dropped, and a phase's
        # keys are the ones that must land on time (a Tail that turns a term off would otherwise never
        # come). The ease ends the step before, so the phase's own key is reached at its start.
        phase = next((t for t, _ in timeline.phases if t > step), None)
        if phase is not None:
            until = min(until, math.ceil(phase) - 1)
        if until <= step:
            return None
        return Decision(self.param, step, goal, until)


def apply(timeline: Timeline, decision: Decision) -> None:
    timeline.tracks[decision.param].retarget(decision.at, decision.value, decision.until)
    timeline._table = None  # values after `at` changed
