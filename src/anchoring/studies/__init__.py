"""Studies that wrap a kind: compare variants of a schedule, train every subset of the terms.

A study trains ordinary runs of its kind (through the lifecycle's `run`, passed in) under its
own directory and adds a comparison on top. A kind lists the studies it supports; asking for
another is one clear error.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from anchoring import runs
from anchoring.domains.colour import rgb_grid
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import median
from anchoring.kinds.colour.config import ColourExperiment
from anchoring.kinds.colour.model import architecture, open_run
from anchoring.kinds.colour.objective import build_objective
from anchoring.report import figures, html
from anchoring.runs import read_metrics
from anchoring.studies.stability import stability

Progress = Callable[[int, int], None]
RunFn = Callable[[Any, Path, Progress | None], Any]  # lifecycle.run: (config, out, progress) -> Outcome


def columns(long: pd.DataFrame) -> dict[str, list[float]]:
    """Long-format metrics back to one list per column (step, seed, each metric), row-aligned."""
    ids = [c for c in ("step", "seed", "arm", "anchored") if c in long.columns]
    wide = long.pivot_table(index=ids, columns="metric", values="value", sort=False).reset_index()
    wide = wide.sort_values(["seed", "step"], kind="stable")
    return {c: wide[c].astype(float).tolist() for c in wide.columns}


def variant_config(cfg: ColourExperiment, variant) -> ColourExperiment:
    """One variant as a run of its own. Its description says which variant it is: the study's own
    describes the comparison, which a variant's report, opened alone, is not."""
    return cfg.model_copy(update={"study": None, "variants": [], "name": f"{cfg.name}-{variant.name}",
                                  "schedule": variant.schedule,
                                  "description": f"Variant {variant.name!r} of {cfg.name}, one arm of this comparison: "
                                                 f"{cfg.description}"})


def compare(cfg: ColourExperiment, path: Path, progress: Progress | None, run: RunFn) -> dict[str, Any]:
    """Train every variant on the same seeds, then put their stability side by side."""
    arms = {}
    for v in cfg.variants:
        outcome = run(variant_config(cfg, v), path / "variants" / v.name, progress)
        arms[v.name] = (outcome, columns(read_metrics(outcome.path)))
    rows = [{"variant": name, **stability(metrics, outcome.summary)} for name, (outcome, metrics) in arms.items()]
    figures.save(figures.compare_curves({n: m for n, (_, m) in arms.items()}), path / "figures" / "compare_loss.png")
    header = list(rows[0])
    sections = [("Overview", f"<p>{html.html.escape(cfg.description)}</p><p>Each variant trained on seeds "
                             f"{', '.join(map(str, cfg.train.member_seeds()))}; full reports: "
                             + ", ".join(html.link_html(f"variants/{name}/report.html", name) for name in arms) + ".</p>"),
                ("Stability and outcome", html.table_html(header, [[r[h] for h in header] for r in rows])),
                ("Loss (median over seeds, band = min–max)", html.image_html(path / "figures" / "compare_loss.png", "loss"))]
    for name, (outcome, _) in arms.items():
        sections.append((f"{name}: latent slices", html.image_html(outcome.path / "figures" / "latent_slices.png", name)))
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
    return {"experiment": cfg.name, "upstream": cfg.upstream, "kind": "colour", "study": "compare", "comparison": rows}


def combination_config(cfg: ColourExperiment) -> tuple[ColourExperiment, list[tuple[str, ...]]]:
    """One training config whose ensemble holds every subset × every seed, and the subsets."""
    names = [t.name for t in build_objective(cfg).terms]
    if not names:  # no subset to train: an empty ensemble failed inside torch, after its folder was written
        raise AnchoringError(f"{cfg.name}: a combinations study needs terms to combine; this experiment has none")
    chosen = cfg.combine or names
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise AnchoringError(f"combine names unknown term(s) {unknown} (terms: {', '.join(names)})")
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:  # "planar + planar" and two "planar" rows, all one mask
        raise AnchoringError(f"combine names {', '.join(map(repr, twice))} more than once")
    subsets = [c for k in range(len(chosen), 0, -1) for c in combinations(chosen, k)]
    seeds = cfg.train.member_seeds()
    masks = [[n in sub or n not in chosen for n in names] for sub in subsets for _ in seeds]
    train_cfg = cfg.train.model_copy(update={"seed_list": seeds * len(subsets), "term_masks": masks})
    return cfg.model_copy(update={"study": None, "combine": [], "name": f"{cfg.name}-ensemble", "train": train_cfg,
                                  "interventions": []}), subsets


def formed(row: dict[str, Any], max_angle: float) -> bool:
    """The target structure: hues in order on the wheel, the anchor hit (where a concept's anchor is
    measured), vibrant colours flat, no collapse."""
    st = row["structure"]
    angle = st.get("anchor_angle_deg")
    return (st["hue_order"] == 1.0 and (angle is None or angle <= max_angle)
            and st["vibrant_in_plane"] >= 0.9 and st["spread_deg"] >= 2.0)


def always_on(cfg: ColourExperiment) -> list[str]:
    """Terms a combinations study leaves out of `combine`: on in every subset, and named as such."""
    return [t.name for t in build_objective(cfg).terms if cfg.combine and t.name not in cfg.combine]


def combine(cfg: ColourExperiment, path: Path, progress: Progress | None, run: RunFn) -> dict[str, Any]:
    """Every subset of the chosen terms × every seed as one ensemble; which subsets form the wheel."""
    train_cfg, subsets = combination_config(cfg)
    outcome = run(train_cfg, path / "ensemble", progress)
    members = outcome.summary["seeds"]
    k = len(cfg.train.member_seeds())
    max_angle = math.degrees(math.acos(min(1.0, cfg.evaluate.min_cosine)))
    rows = []
    for j, sub in enumerate(subsets):
        group = members[j * k:(j + 1) * k]
        def med(key: str, group: list[dict] = group) -> float:
            return median(g["structure"].get(key, float("nan")) for g in group)

        rows.append({"terms": " + ".join(sub), "n_terms": len(sub), "formed": f"{sum(formed(g, max_angle) for g in group)}/{k}",
                     "hue_order": med("hue_order"), "anchor_angle_deg": med("anchor_angle_deg"),
                     "vibrant_in_plane": med("vibrant_in_plane"), "spread_deg": med("spread_deg"),
                     "val_mse": median(g["val_mse"] for g in group)})
    run_ = open_run(outcome.path, train_cfg, architecture(train_cfg), None)
    grid_points = rgb_grid(8)
    z = run_.encode(grid_points)[::k]  # first seed of each subset
    figures.save(figures.thumbnail_grid(z, grid_points, [r["terms"] for r in rows], tuple(cfg.evaluate.hue_dims)),
                 path / "figures" / "combinations.png")
    header = list(rows[0])
    fixed = always_on(cfg)
    anchored = any("anchor_angle_deg" in m["structure"] for m in members)
    sections = [("Overview", f"<p>{html.html.escape(cfg.description)}</p><p>{len(subsets)} subsets × {k} seed(s) trained as one ensemble; "
                             f"'formed' = hue order 1.0, "
                             f"{f'anchor within {max_angle:.0f}°, ' if anchored else ''}≥ 90% of vibrant energy in the "
                             f"hue plane, nearest-neighbour spread ≥ 2°"
                             f"{'' if anchored else ' (no anchor measured: evaluate.concept names no anchored concept)'}. "
                             f"{f'On in every subset as well (not in combine): {html.html.escape(chr(44).join(fixed))}. ' if fixed else ''}"
                             f"Per-member details: {html.link_html('ensemble/report.html', 'ensemble/report.html')}.</p>"),
                ("Per subset (medians over seeds)", html.table_html(header, [[r[h] for h in header] for r in rows])),
                ("Latents (first seed of each subset, hue dims)", html.image_html(path / "figures" / "combinations.png", "grid"))]
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
    return {"experiment": cfg.name, "upstream": cfg.upstream, "kind": "colour", "study": "combinations", "combinations": rows,
            "always_on": fixed}


def check_variant_names(names: list[str], experiment: str) -> None:
    """Each variant trains into variants/<name> and is reported under its name, so a name must be one
    plain folder name and no two may match; refused here, before the first variant trains."""
    unsafe = [n for n in names if not runs.SAFE_NAME.fullmatch(n)]
    if unsafe:
        raise AnchoringError(f"{experiment}: [[variants]] name(s) {', '.join(map(repr, unsafe))} must each be one folder "
                             f"name: letters, digits and _.,+=- only, starting with a letter or digit")
    repeated = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if repeated:
        raise AnchoringError(f"{experiment}: [[variants]] name(s) {', '.join(map(repr, repeated))} given more than once; "
                             f"each variant needs its own name (it names the variant's folder and its row)")


def validate(cfg: Any, kind) -> None:
    """The study exists for this kind, and every run it will train is valid."""
    study = getattr(cfg, "study", None)
    if study is None:
        return
    if study not in kind.studies:
        raise AnchoringError(f"a {kind.name!r} experiment cannot be a {study!r} study")
    if study == "compare":
        if len(cfg.variants) < 2:
            raise AnchoringError(f"{cfg.name}: a comparison needs at least two [[variants]]")
        check_variant_names([v.name for v in cfg.variants], cfg.name)
        for v in cfg.variants:
            try:
                kind.validate(variant_config(cfg, v))
            except AnchoringError as e:  # "schedule has no column 'repel'" said nothing of which variant's schedule
                raise AnchoringError(f"variant {v.name!r}: {e}") from None
    elif study == "combinations":
        if getattr(cfg, "reactive", None):  # a controller reads the median over every member: all subsets at once
            raise AnchoringError(f"{cfg.name}: [[reactive]] controllers would steer every subset by the median of all "
                                 f"of them, so the subsets would not train independently; drop them, or compare "
                                 f"the subsets as separate runs")
        kind.validate(combination_config(cfg)[0])


def execute(cfg: Any, path: Path, progress: Progress | None, run: RunFn) -> dict[str, Any]:
    return {"compare": compare, "combinations": combine}[cfg.study](cfg, path, progress, run)
