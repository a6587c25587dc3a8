"""The one median the project reports: NaN-aware, the mean of the middle two for even counts."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def median(values: Iterable[float]) -> float:
    """Median over the finite values; NaN when there are none (written as null in JSON)."""
    a = np.asarray([float(v) for v in values], dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")
