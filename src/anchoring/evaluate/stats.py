"""The one median the project reports: NaN-aware, the mean of the middle two for even counts."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def median(values: Iterable[float]) -> float:
    """Median over the finite values; NaN when there are none (written as null in JSON)."""
    a = np.asarray([float(v) for v in values], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def target_text(value: float | None, decimals: int = 3) -> str:
    """A target's number as a target line prints it: `decimals` places, more where rounding would
    land on a multiple of 0.01 (where every bound lives: 0.02, 0.1, 0.3, 1.60 …) that the value is
    not, so a missed 0.0204 never prints as "0.020" next to "≤ 0.02". NaN/None: "undefined"."""
    if value is None or value != value:
        return "undefined"
    text = f"{value:.{decimals}f}"
    while decimals < 8 and abs(round(float(text) * 100) - float(text) * 100) < 1e-9 and abs(float(text) - value) > 1e-9:
        decimals += 1
        text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return text
