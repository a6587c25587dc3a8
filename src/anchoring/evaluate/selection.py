"""Choosing seeds a user can trust, from numbers known without looking at the edit's target.

A run trains many seeds; a user wants the ones that reconstruct well, anchored well, and
whose edit damaged colours in proportion to their similarity to the concept. None of these
three uses the concept's own error after the edit, so selecting on them is not selecting on
the result being reported. The Pareto front keeps every seed that no other seed beats on
all three at once: no weights to tune, and a seed that is best at any one objective stays.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from anchoring.evaluate.control import pareto_front
from anchoring.evaluate.stats import median

OBJECTIVES = ("val_mse", "val_anchor_loss")  # both: lower is better


def pareto_selection(rows: Sequence[Mapping], selectivity: Sequence[float]) -> list[int]:
    """Seeds on the Pareto front of (val_mse ↓, val_anchor_loss ↓, selectivity ↑), in row order.

    `rows` are per-seed dicts with `seed`, `val_mse` and `val_anchor_loss` (a missing anchoring
    loss counts as 0 for every seed, so it decides nothing); `selectivity[i]` belongs to row i.
    """
    if len(rows) != len(selectivity):
        raise ValueError(f"{len(rows)} rows but {len(selectivity)} selectivity values")
    if not rows:
        return []
    obj = np.array([[float(r[k]) if r.get(k) is not None else 0.0 for k in OBJECTIVES] + [-float(s)]
                    for r, s in zip(rows, selectivity)])
    return [int(rows[i]["seed"]) for i in pareto_front(obj)]


def edit_summary(named_after: Mapping[str, Sequence[float]], seeds: Sequence[int], selected: Sequence[int],
                 selectivity: Sequence[float] | None = None) -> list[dict]:
    """Per colour: median error after the edit over all seeds and over the selected seeds.

    `named_after` maps colour → one value per seed (in `seeds` order), as in a run's
    `summary.json: interventions.<edit>.named_after`. With `selectivity`, a last row named
    `selectivity` compares that too. Reading both columns side by side shows what selection
    buys, and whether it merely hides seeds where the edit missed.
    """
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError("seeds repeat (a seed_list with repeats): selection by seed would be ambiguous")
    index = {int(s): i for i, s in enumerate(seeds)}
    missing = [s for s in selected if int(s) not in index]
    if missing:
        raise ValueError(f"selected seeds {missing} are not among the run's seeds")
    picks = [index[int(s)] for s in selected]

    def row(name: str, values: Sequence[float]) -> dict:
        if len(values) != len(seeds):
            raise ValueError(f"{name!r}: {len(values)} values for {len(seeds)} seeds")
        chosen = [float(values[i]) for i in picks]
        return {"colour": name, "all": median(values),
                "selected": median(chosen),
                "n_all": len(values), "n_selected": len(chosen)}

    out = [row(name, vals) for name, vals in named_after.items()]
    if selectivity is not None:
        out.append(row("selectivity", selectivity))
    return out
