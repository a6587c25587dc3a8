"""Shapes for interventions: how hard to act as a function of the concept's cosine α ∈ [0, 1].

A *falloff* g(α) ∈ [0, b] scales suppression; a *mapper* m(α) ≤ α gives the new cosine for
repulsion. All are small frozen dataclasses, callable on tensors, so they print and compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anchoring.errors import AnchoringError


@dataclass(frozen=True)
class Constant:
    """g(α) = strength everywhere (strength 1: plain projection)."""

    strength: float = 1.0

    def __call__(self, alpha: torch.Tensor) -> torch.Tensor:
        return torch.full_like(alpha, self.strength)


@dataclass(frozen=True)
class BoundedPower:
    """0 below the threshold a, then rising as ((α − a)/(1 − a))^p up to the ceiling b at α = 1."""

    a: float = 0.0
    p: float = 1.0
    b: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.a < 1.0:
            raise AnchoringError(f"falloff threshold a must be in [0, 1), got {self.a}")
        if self.p <= 0:
            raise AnchoringError(f"falloff power p must be > 0, got {self.p}")
        if self.b < 0:
            raise AnchoringError(f"falloff ceiling b must be ≥ 0, got {self.b}")

    def __call__(self, alpha: torch.Tensor) -> torch.Tensor:
        t = ((alpha - self.a) / (1.0 - self.a)).clamp(0.0, 1.0)
        return self.b * t.pow(self.p)


def Linear(a: float = 0.0, b: float = 1.0) -> BoundedPower:  # noqa: N802 - reads as a shape name
    """Bounded power with p = 1: a ramp from the threshold to the ceiling."""
    return BoundedPower(a=a, p=1.0, b=b)


@dataclass(frozen=True)
class FalloffMapper:
    """m(α) = α·(1 − g(α)): repulsion that removes the fraction g of the cosine."""

    falloff: BoundedPower | Constant = BoundedPower()

    def __call__(self, alpha: torch.Tensor) -> torch.Tensor:
        return alpha * (1.0 - self.falloff(alpha).clamp(0.0, 1.0))


@dataclass(frozen=True)
class BezierMapper:
    """Smooth cubic Bézier from (0, 0) to (1, end) with control points (x1, y1), (x2, y2).

    The curve is given parametrically; m(α) solves x(t) = α by bisection (x is monotone
    when 0 ≤ x1, x2 ≤ 1) and returns y(t), clamped to ≤ α so repulsion never attracts.
    """

    x1: float = 0.5
    y1: float = 0.0
    x2: float = 0.9
    y2: float = 0.1
    end: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.x1 <= 1.0 and 0.0 <= self.x2 <= 1.0):
            raise AnchoringError("Bézier control x-coordinates must lie in [0, 1]")

    @staticmethod
    def _cubic(t: torch.Tensor, p1: float, p2: float, p3: float) -> torch.Tensor:
        s = 1.0 - t
        return 3 * s * s * t * p1 + 3 * s * t * t * p2 + t**3 * p3

    def __call__(self, alpha: torch.Tensor) -> torch.Tensor:
        x = alpha.clamp(0.0, 1.0)
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(40):  # 2^-40: far below float32 resolution
            mid = (lo + hi) / 2
            below = self._cubic(mid, self.x1, self.x2, 1.0) < x
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        y = self._cubic((lo + hi) / 2, self.y1, self.y2, self.end)
        return torch.minimum(y, alpha)


def parse_falloff(text: str | None) -> BoundedPower | Constant | BezierMapper:
    """CLI form: `constant[:s]`, `linear:a,b`, `power:a,p,b` (e.g. `power:0.2,2,1`), `bezier:x1,y1,x2,y2,end`."""
    if not text:
        return Constant()
    kind, _, args = text.partition(":")
    try:
        nums = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        raise AnchoringError(f"falloff {text!r}: arguments must be numbers") from None
    shapes = {"constant": (Constant, 1), "linear": (Linear, 2), "power": (BoundedPower, 3), "bezier": (BezierMapper, 5)}
    if kind not in shapes:
        raise AnchoringError(f"unknown falloff {kind!r} (use constant[:s], linear:a,b, power:a,p,b or bezier:x1,y1,x2,y2,end)")
    fn, most = shapes[kind]
    if len(nums) > most:
        raise AnchoringError(f"falloff {kind!r} takes at most {most} numbers, got {len(nums)}")
    if not all(math.isfinite(x) for x in nums):  # nan or inf would turn every edited value into NaN
        raise AnchoringError(f"falloff {text!r}: arguments must be finite numbers")
    if kind == "constant" and nums and nums[0] < 0:
        raise AnchoringError(f"falloff strength must be ≥ 0, got {nums[0]:g} (a negative strength adds the concept)")
    forms = {"constant": "constant:s", "linear": "linear:a,b", "power": "power:a,p,b", "bezier": "bezier:x1,y1,x2,y2,end"}
    try:
        return fn(*nums)
    except AnchoringError as e:  # name the form: `power:1` sets a (the threshold), not p
        given = ", ".join(f"{n}={x:g}" for n, x in zip(forms[kind].split(":")[1].split(","), nums))
        rest = "; numbers left out keep their defaults" if len(nums) < most else ""
        raise AnchoringError(f"{e} (falloff {text!r} reads as {forms[kind]} with {given}{rest})") from None
