"""Training-stability figures for comparing schedules: spikes, spread across seeds, outcome."""

from __future__ import annotations

from typing import Any

import numpy as np

from anchoring.evaluate.stats import median


def loss_spikes(loss: np.ndarray, window: int = 50, ratio: float = 3.0) -> int:
    """Steps whose loss exceeds `ratio` × the median of the preceding `window` steps."""
    count = 0
    for t in range(window, len(loss)):
        if loss[t] > ratio * np.median(loss[t - window:t]):
            count += 1
    return count


def stability(metrics: dict[str, list[float]], summary: dict[str, Any]) -> dict[str, Any]:
    """One row per variant; `metrics` as from `Run.metrics()`, `summary` the variant's summary.json."""
    seeds = sorted(set(metrics["seed"]))
    seed_col = np.array(metrics["seed"])
    loss = np.array(metrics["loss"])
    spikes = [loss_spikes(loss[seed_col == s]) for s in seeds]
    final = [loss[seed_col == s][-1] for s in seeds]
    rows = summary["seeds"]
    return {
        "loss spikes / seed (median)": float(median(spikes)),
        "final loss (median)": float(median(final)),
        "final loss spread (max/min)": float(max(final) / max(min(final), 1e-12)),
        "val MSE (median)": float(median(r["val_mse"] for r in rows)),
        "hues in order": f"{sum(r['hue_order'] for r in rows)}/{len(rows)}",
        "hue_order score (mean)": float(np.mean([r["structure"]["hue_order"] for r in rows])),
        "vibrant in plane (mean)": float(np.mean([r["structure"]["vibrant_in_plane"] for r in rows])),
    }
