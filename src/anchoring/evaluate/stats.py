"""The one median the project reports: NaN-aware, the mean of the middle two for even counts."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def median(values: Iterable[float], rank_infinite: bool = False) -> float:
    """Median over the finite values; NaN when there are none (written as null in JSON).

    `rank_infinite`: ±inf count, as the extremes they are (a seed that never recovered, an edit with
    no retain cost), instead of being left out; NaN (undefined) is left out either way."""
    a = np.asarray([float(v) for v in values], dtype=np.float64)
    a = a[~np.isnan(a)] if rank_infinite else a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def mark_infinite(targets: dict[str, dict]) -> dict[str, dict]:
    """Targets whose median is ±∞ (a ratio over seeds whose denominators were 0) get `"infinite": ±1`:
    summary.json stores non-finite numbers as null, and without the mark `anchoring show` would print
    "undefined" where the run's own report printed ∞."""
    for t in targets.values():
        v = t.get("median")
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            t["infinite"] = 1 if v > 0 else -1
    return targets


def target_median(t: dict) -> float | None:
    """The figure a target is judged on as it was in the run, also once read back from summary.json:
    its median over seeds, or its worst seed where the target names one (`worst`)."""
    if "worst" in t:
        return t["worst"]
    return float("inf") * t["infinite"] if t.get("infinite") else t.get("median")


def target_text(value: float | None, decimals: int = 3) -> str:
    """A target's number as a target line prints it: `decimals` places, more where rounding would
    land on a multiple of 0.01 (where every bound lives: 0.02, 0.1, 0.3, 1.60 …) that the value is
    not, so a missed 0.0204 never prints as "0.020" next to "≤ 0.02". NaN/None: "undefined"."""
    if value is None or value != value:
        return "undefined"
    if value in (float("inf"), float("-inf")):  # a ratio over a zero denominator: rounding it would overflow
        return "∞" if value > 0 else "−∞"
    text = f"{value:.{decimals}f}"
    while decimals < 8 and abs(round(float(text) * 100) - float(text) * 100) < 1e-9 and abs(float(text) - value) > 1e-9:
        decimals += 1
        text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return text
