"""One hyperparameter over time: keyframes joined by easing segments, re-targetable mid-flight.

Every eased segment is a quintic in normalised time u ∈ [0, 1], fixed by the value, velocity
and acceleration at both ends (a quintic Hermite). Between plain keyframes the end
velocities and accelerations are zero, which is exactly minimum-jerk easing
(y0 + Δ·(10u³ − 15u⁴ + 6u⁵)). Re-targeting starts a new quintic from the *current* value,
velocity and acceleration, so the curve has no jump in any of them where the target changes.
Where that quintic would overshoot past its bounds (the value at re-targeting and the new target),
the value holds the bound instead: velocity and acceleration drop to zero at that point.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterable, Literal

from anchoring.errors import AnchoringError

Space = Literal["linear", "log"]
Interp = Literal["minjerk", "linear", "step"]
SPACES: tuple[str, ...] = ("linear", "log")
INTERPS: tuple[str, ...] = ("minjerk", "linear", "step")


def quintic_coeffs(y0: float, v0: float, a0: float, y1: float, v1: float, a1: float, span: float) -> tuple[float, ...]:
    """Coefficients c0..c5 of y(u) with the given end states; v, a are per step (scaled by span)."""
    p0d, p1d = v0 * span, v1 * span
    p0dd, p1dd = a0 * span * span, a1 * span * span
    d = y1 - y0
    return (
        y0,
        p0d,
        p0dd / 2.0,
        10.0 * d - 6.0 * p0d - 4.0 * p1d - (3.0 * p0dd - p1dd) / 2.0,
        -15.0 * d + 8.0 * p0d + 7.0 * p1d + (3.0 * p0dd - 2.0 * p1dd) / 2.0,
        6.0 * d - 3.0 * (p0d + p1d) - (p0dd - p1dd) / 2.0,
    )


@dataclass(frozen=True)
class Segment:
    t0: float
    t1: float
    coeffs: tuple[float, ...]  # polynomial in u; a 'step' segment is a constant
    end_value: float  # value from t1 on (differs from the polynomial's end only for steps)
    # a re-targeted segment stays between its start and its goal: starting from the track's current
    # velocity, the quintic can overshoot either (a falling weight raised mid-flight would first dip
    # below zero), which for a weight or a learning rate means a term rewarded or a step reversed
    bounds: tuple[float, float] | None = None

    def state(self, t: float) -> tuple[float, float, float]:
        """(value, d/dt, d²/dt²) at t ∈ [t0, t1)."""
        span = self.t1 - self.t0
        u = (t - self.t0) / span
        y = dy = ddy = 0.0
        for k, c in enumerate(self.coeffs):
            y += c * u**k
            if k >= 1:
                dy += k * c * u ** (k - 1)
            if k >= 2:
                ddy += k * (k - 1) * c * u ** (k - 2)
        if self.bounds is not None and not self.bounds[0] <= y <= self.bounds[1]:
            return min(max(y, self.bounds[0]), self.bounds[1]), 0.0, 0.0
        return y, dy / span, ddy / (span * span)


class Track:
    """Keyframed value with interpolation `interp` in `space` (log: eased in log10)."""

    def __init__(self, keys: Iterable[tuple[float, float]], space: Space = "linear", interp: Interp = "minjerk", name: str = "value") -> None:
        if space not in SPACES:
            raise AnchoringError(f"{name}: unknown space {space!r} (use one of {', '.join(SPACES)})")
        if interp not in INTERPS:
            raise AnchoringError(f"{name}: unknown interpolation {interp!r} (use one of {', '.join(INTERPS)})")
        self.name, self.space, self.interp = name, space, interp
        keys = sorted(((float(t), float(v)) for t, v in keys), key=lambda kv: kv[0])
        if not keys:
            raise AnchoringError(f"{name}: a track needs at least one keyframe")
        for (ta, _), (tb, _) in zip(keys, keys[1:]):
            if ta == tb:
                raise AnchoringError(f"{name}: two keyframes at step {ta:g}")
        self.keys = [(t, self._to_space(v)) for t, v in keys]
        self._build()

    # -- value space -------------------------------------------------------------------
    def _to_space(self, v: float) -> float:
        if self.space == "log":
            if v <= 0:
                raise AnchoringError(f"{self.name}: log-space value must be > 0, got {v:g}")
            return math.log10(v)
        return v

    def _from_space(self, y: float) -> float:
        return 10.0**y if self.space == "log" else y

    # -- segments ----------------------------------------------------------------------
    def _segment(self, t0: float, y0: float, t1: float, y1: float, v0: float = 0.0, a0: float = 0.0, eased: bool = False) -> Segment:
        span = t1 - t0
        if eased or self.interp == "minjerk":
            return Segment(t0, t1, quintic_coeffs(y0, v0, a0, y1, 0.0, 0.0, span), y1)
        if self.interp == "linear":
            return Segment(t0, t1, (y0, y1 - y0), y1)
        return Segment(t0, t1, (y0,), y1)  # step: hold, then jump at t1

    def _build(self) -> None:
        self.segments = [self._segment(t0, y0, t1, y1) for (t0, y0), (t1, y1) in zip(self.keys, self.keys[1:])]
        self._starts = [s.t0 for s in self.segments]

    def _state(self, t: float) -> tuple[float, float, float]:
        if t < self.keys[0][0]:
            return self.keys[0][1], 0.0, 0.0
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0 and t < self.segments[i].t1:
            return self.segments[i].state(t)
        # at or past the end of segment i (or after the last key): hold its end value
        return (self.segments[i].end_value if i >= 0 else self.keys[0][1]), 0.0, 0.0

    def __call__(self, t: float) -> float:
        return self._from_space(self._state(t)[0])

    def velocity(self, t: float) -> float:
        """d(value)/d(step), in real space."""
        y, dy, _ = self._state(t)
        return dy * (math.log(10.0) * 10.0**y if self.space == "log" else 1.0)

    def key_values(self) -> list[tuple[float, float]]:
        """Keyframes as (step, value) in real space."""
        return [(t, self._from_space(y)) for t, y in self.keys]

    # -- reactive ----------------------------------------------------------------------
    def retarget(self, at: float, value: float, until: float) -> None:
        """From step `at`, head for `value` at step `until` with no jump in value or velocity.

        Keyframes between `at` and `until` are dropped; later keyframes stay and are reached
        from the new goal with the track's usual interpolation. On the way the value stays between
        where it was at `at` and `value` (where the eased curve would overshoot, it holds the bound).
        """
        if until <= at:
            raise AnchoringError(f"{self.name}: retarget must end after it starts ({until:g} ≤ {at:g})")
        y, dy, ddy = self._state(at)
        goal = self._to_space(value)
        before = [s for s in self.segments if s.t1 <= at]
        cut = [s for s in self.segments if s.t0 < at < s.t1]
        if cut:  # keep the part of the running segment before `at`, re-expressed on [t0, at]
            s = cut[0]
            keep = (at - s.t0) / (s.t1 - s.t0)
            coeffs = tuple(c * keep**k for k, c in enumerate(s.coeffs))
            before.append(Segment(s.t0, at, coeffs, y, s.bounds))
        elif not before and at > self.keys[0][0]:
            before.append(Segment(self.keys[0][0], at, (self.keys[0][1],), y))
        eased = self._segment(at, y, until, goal, v0=dy, a0=ddy, eased=True)
        new = [Segment(eased.t0, eased.t1, eased.coeffs, eased.end_value, (min(y, goal), max(y, goal)))]
        later = [(t, v) for t, v in self.keys if t > until]
        prev_t, prev_y = until, goal
        for t, v in later:
            new.append(self._segment(prev_t, prev_y, t, v))
            prev_t, prev_y = t, v
        first = before[0].t0 if before else at
        self.segments = before + new
        self.keys = [(first, self.segments[0].coeffs[0])] + [(s.t1, s.end_value) for s in self.segments]
        self._starts = [s.t0 for s in self.segments]

    def rescaled(self, factor: float) -> "Track":
        """The same curve stretched in time (keyframes only; re-targets are not carried).

        Keys land on whole steps. A key whose whole step would meet the key before it, or reach the
        next key's place (a 10-step warm-up in a run cut to 60), keeps its exact, fractional place
        instead, so no keyframe is lost and the order is kept; only keys that stretch onto the very same
        point (factor 0) merge, the later one kept."""
        exact = [t * factor for t, _ in self.keys]
        dedup: dict[float, float] = {}
        last = -math.inf
        for i, (_, y) in enumerate(self.keys):
            at = float(round(exact[i]))
            if at <= last or (i + 1 < len(exact) and at >= exact[i + 1]):
                at = exact[i] if exact[i] > last else last
            dedup[at] = self._from_space(y)
            last = at
        return Track(dedup.items(), self.space, self.interp, self.name)
