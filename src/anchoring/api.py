"""The experiment API the CLI calls: run or resume, evaluate, write the run directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as st_save

from anchoring import runs, transformer_api
from anchoring.config import ExperimentConfig, load_config
from anchoring.control import parse_falloff
from anchoring.control.plan import make_plan
from anchoring.domains.colour import NAMES, named_rgb, rgb_grid
from anchoring.errors import AnchoringError
from anchoring.evaluate.colour import summarize_seeds
from anchoring.evaluate.control import (
    evaluate_edit,
    named_error_table,
    pareto_front,
    stacked,
)
from anchoring.evaluate.stability import stability
from anchoring.report import animation, figures, html
from anchoring.train import TrainResult, train
from anchoring.train.loop import CHECKPOINT, metrics_table
from anchoring.train.objective import (
    build_objective,
    build_timeline,
    check_curriculum,
    training_points,
)

Progress = Callable[[int, int], None]


@dataclass
class Outcome:
    path: Path
    summary: dict[str, Any]


def validate(cfg: ExperimentConfig) -> None:
    """Everything that can be checked without training, so bad input writes nothing."""
    if cfg.kind == "combinations":
        validate(combination_config(cfg)[0])
        return
    if cfg.kind == "transformer":
        transformer_api.validate(cfg)
        return
    if cfg.kind == "compare":
        if len(cfg.variants) < 2:
            raise AnchoringError(f"{cfg.name}: a comparison needs at least two [[variants]]")
        for v in cfg.variants:
            validate(variant_config(cfg, v))
        return
    if cfg.kind != "train":  # figure-only: nothing to train, only lobes to check
        if cfg.kind == "lobes" and not cfg.lobes:
            raise AnchoringError(f"{cfg.name}: a 'lobes' experiment needs [[lobes]] entries")
        for lobe in cfg.lobes:
            parse_falloff(lobe.falloff)
        return
    objective = build_objective(cfg)
    check_curriculum(cfg, build_timeline(cfg, objective))
    names = [i.name for i in cfg.interventions]
    if len(set(names)) != len(names):
        raise AnchoringError("intervention names must be unique")
    for spec in cfg.interventions:
        make_plan(spec, objective.concepts, cfg.model.latent_dim)
    for c in cfg.concepts:
        for d in c.dims or []:
            if not 0 <= d < cfg.model.latent_dim:
                raise AnchoringError(f"concept {c.name!r}: dim {d} is outside 0..{cfg.model.latent_dim - 1}")


def run(cfg: ExperimentConfig, out: Path | None = None, *, progress: Progress | None = None) -> Outcome:
    validate(cfg)
    path = runs.new_run_dir(cfg, out)
    path.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(path / runs.CONFIG, cfg.to_toml())
    if cfg.kind == "compare":
        return _compare(cfg, path, progress)
    if cfg.kind == "combinations":
        return _combinations(cfg, path, progress)
    if cfg.kind == "transformer":
        return Outcome(path, transformer_api.run(cfg, path, progress=progress))
    if cfg.kind != "train":
        return _draw_figures(cfg, path)
    runs.write_atomic(path / runs.ARCH, json.dumps(runs.architecture(cfg), indent=2))
    return _train_and_finish(cfg, path, resume=False, progress=progress)


def variant_config(cfg: ExperimentConfig, variant) -> ExperimentConfig:
    return cfg.model_copy(update={"kind": "train", "variants": [], "name": f"{cfg.name}-{variant.name}",
                                  "schedule": variant.schedule})


def _compare(cfg: ExperimentConfig, path: Path, progress: Progress | None) -> Outcome:
    """Train every variant on the same seeds, then put their stability side by side."""
    arms = {}
    for v in cfg.variants:
        outcome = run(variant_config(cfg, v), path / "variants" / v.name, progress=progress)
        arms[v.name] = (outcome, runs.load_run(outcome.path).metrics())
    rows = [{"variant": name, **stability(metrics, outcome.summary)} for name, (outcome, metrics) in arms.items()]
    figures.save(figures.compare_curves({n: m for n, (_, m) in arms.items()}), path / "figures" / "compare_loss.png")
    header = list(rows[0])
    sections = [("Overview", f"<p>{cfg.description}</p><p>Each variant trained on seeds {cfg.train.seed}…"
                             f"{cfg.train.seed + cfg.train.seeds - 1}; full reports under variants/.</p>"),
                ("Stability and outcome", html.table_html(header, [[r[h] for h in header] for r in rows])),
                ("Loss (median over seeds, band = min–max)", html.image_html(path / "figures" / "compare_loss.png", "loss"))]
    for name, (outcome, _) in arms.items():
        sections.append((f"{name}: latent slices", html.image_html(outcome.path / "figures" / "latent_slices.png", name)))
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
    summary = {"experiment": cfg.name, "upstream": cfg.upstream, "seeds": [], "anchored_seeds": None, "comparison": rows}
    runs.write_atomic(path / runs.SUMMARY, json.dumps(summary, indent=2))
    return Outcome(path, summary)


def combination_config(cfg: ExperimentConfig) -> tuple[ExperimentConfig, list[tuple[str, ...]]]:
    """One training config whose ensemble holds every subset × every seed, and the subsets."""
    names = [t.name for t in build_objective(cfg).terms]
    chosen = cfg.combine or names
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise AnchoringError(f"combine names unknown term(s) {unknown} (terms: {', '.join(names)})")
    subsets = [c for k in range(len(chosen), 0, -1) for c in combinations(chosen, k)]
    seeds = cfg.train.member_seeds()
    masks = [[n in sub or n not in chosen for n in names] for sub in subsets for _ in seeds]
    train_cfg = cfg.train.model_copy(update={"seed_list": seeds * len(subsets), "term_masks": masks})
    return cfg.model_copy(update={"kind": "train", "combine": [], "name": f"{cfg.name}-ensemble", "train": train_cfg,
                                  "interventions": []}), subsets


def formed(row: dict[str, Any], max_angle: float) -> bool:
    """The target structure: hues in order on the wheel, the anchor hit, vibrant colours flat, no collapse."""
    st = row["structure"]
    return (st["hue_order"] == 1.0 and st.get("anchor_angle_deg", 0.0) <= max_angle
            and st["vibrant_in_plane"] >= 0.9 and st["spread_deg"] >= 2.0)


def _combinations(cfg: ExperimentConfig, path: Path, progress: Progress | None) -> Outcome:
    import math
    import statistics

    train_cfg, subsets = combination_config(cfg)
    outcome = run(train_cfg, path / "ensemble", progress=progress)
    members = outcome.summary["seeds"]
    k = len(cfg.train.member_seeds())
    max_angle = math.degrees(math.acos(min(1.0, cfg.evaluate.min_cosine)))
    rows = []
    for j, sub in enumerate(subsets):
        group = members[j * k:(j + 1) * k]
        def med(key: str, group: list[dict] = group) -> float:
            return statistics.median(g["structure"].get(key, float("nan")) for g in group)

        rows.append({"terms": " + ".join(sub), "n_terms": len(sub), "formed": f"{sum(formed(g, max_angle) for g in group)}/{k}",
                     "hue_order": med("hue_order"), "anchor_angle_deg": med("anchor_angle_deg"),
                     "vibrant_in_plane": med("vibrant_in_plane"), "spread_deg": med("spread_deg"),
                     "val_mse": statistics.median(g["val_mse"] for g in group)})
    run_ = runs.load_run(outcome.path)
    grid_points = rgb_grid(8)
    z = run_.encode(grid_points)[::k]  # first seed of each subset
    figures.save(figures.thumbnail_grid(z, grid_points, [r["terms"] for r in rows], tuple(cfg.evaluate.hue_dims)),
                 path / "figures" / "combinations.png")
    header = list(rows[0])
    sections = [("Overview", f"<p>{cfg.description}</p><p>{len(subsets)} subsets × {k} seed(s) trained as one ensemble; "
                             f"'formed' = hue order 1.0, anchor within {max_angle:.0f}°, ≥ 90% of vibrant energy in the "
                             f"hue plane, nearest-neighbour spread ≥ 2°. Per-member details under ensemble/.</p>"),
                ("Per subset (medians over seeds)", html.table_html(header, [[r[h] for h in header] for r in rows])),
                ("Latents (first seed of each subset, hue dims)", html.image_html(path / "figures" / "combinations.png", "grid"))]
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
    summary = {"experiment": cfg.name, "upstream": cfg.upstream, "seeds": [], "anchored_seeds": None, "combinations": rows}
    runs.write_atomic(path / runs.SUMMARY, json.dumps(summary, indent=2))
    return Outcome(path, summary)


def _draw_figures(cfg: ExperimentConfig, path: Path) -> Outcome:
    """Figure-only experiments: no training, a report of figures."""
    sections = [("Overview", f"<p>{cfg.description}</p>")]
    if cfg.kind == "lobes":
        sections += _lobe_sections(cfg, path)
    else:
        made = figures.colour_spaces() if cfg.kind == "colour-spaces" else figures.timing_functions()
        for name, fig in made:
            figures.save(fig, path / "figures" / f"{name}.png")
            sections.append((name.replace("_", " "), html.image_html(path / "figures" / f"{name}.png", name)))
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
    summary = {"experiment": cfg.name, "upstream": cfg.upstream, "seeds": [], "anchored_seeds": None,
               "figures": sorted(p.name for p in (path / "figures").glob("*.png"))}
    runs.write_atomic(path / runs.SUMMARY, json.dumps(summary, indent=2))
    return Outcome(path, summary)


def _lobe_sections(cfg: ExperimentConfig, path: Path) -> list[tuple[str, str]]:
    """Every configured falloff/mapper as polar lobes and strength curves."""
    sections = []
    for method in ("suppress", "repel"):
        shapes = {f"{lobe.name} ({lobe.falloff})": parse_falloff(lobe.falloff) for lobe in cfg.lobes if lobe.method == method}
        if not shapes:
            continue
        figures.save(figures.intervention_lobes(shapes, method), path / "figures" / f"{method}_lobes.png")
        figures.save(figures.strength_curves(shapes), path / "figures" / f"{method}_strength.png")
        sections += [(f"{method}: lobes", html.image_html(path / "figures" / f"{method}_lobes.png", f"{method} lobes")),
                     (f"{method}: strength vs alignment", html.image_html(path / "figures" / f"{method}_strength.png", "strength"))]
    return sections


def resume(path: Path, *, progress: Progress | None = None) -> Outcome:
    if not (path / runs.CONFIG).is_file():
        raise AnchoringError(f"{str(path)!r} is not a run directory (no {runs.CONFIG})")
    if not (path / CHECKPOINT).is_file() and not (path / "arms").is_dir():
        raise AnchoringError(f"{str(path)!r} has no checkpoint to resume from")
    cfg = load_config(path / runs.CONFIG)
    if cfg.kind == "transformer":
        return Outcome(path, transformer_api.run(cfg, path, progress=progress))
    return _train_and_finish(cfg, path, resume=True, progress=progress)


def _train_and_finish(cfg: ExperimentConfig, path: Path, *, resume: bool, progress: Progress | None) -> Outcome:
    t0 = time.perf_counter()
    result = train(cfg, path, resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    summary = finish(result, path)
    summary["timing"] = {"train_s": round(train_s, 3), "total_s": round(time.perf_counter() - t0, 3)}
    runs.write_atomic(path / runs.SUMMARY, json.dumps(summary, indent=2))
    return Outcome(path, summary)


def finish(result: TrainResult, path: Path) -> dict[str, Any]:
    """Metrics, snapshots, evaluation, figures and report for a trained ensemble."""
    cfg = result.config
    header = ["step", "seed", *result.timeline.names, *result.metric_names]
    runs.write_metrics_csv(path / runs.METRICS, header, metrics_table(result))
    runs.write_atomic(path / runs.SNAPSHOTS, st_save({"points": result.snapshot_points,
                                                      **{f"step.{s}": z for s, z in sorted(result.snapshots.items())}}))
    models = result.ensemble.members()
    with torch.no_grad():
        encode = lambda x: torch.stack([m.encode(x) for m in models])  # noqa: E731
        recon = lambda x: torch.stack([m(x) for m in models])  # noqa: E731
        # validate on what the model was meant to learn: the RGB cube, or the HSV grid it trained on
        validation = rgb_grid(cfg.data.validation_levels) if cfg.data.space == "rgb" else training_points(cfg)[0]
        rows = summarize_seeds(encode, recon, cfg, result.objective, validation)
        slice_points = rgb_grid(8)
        z = encode(slice_points)
    anchor = next((torch.tensor(c.anchor) for c in result.objective.concepts
                   if c.name == cfg.evaluate.concept and c.anchor is not None), None)
    figdir = path / "figures"
    figures.save(figures.latent_slices(z, slice_points, result.seeds, anchor), figdir / "latent_slices.png")
    figures.save(figures.loss_curves(result.metrics, result.metric_names, result.seeds), figdir / "loss_curves.png")
    figures.save(figures.schedule_plot(result.timeline), figdir / "schedule.png")
    if len(result.snapshots) > 1:
        dims = tuple(cfg.evaluate.hue_dims)
        figures.save(figures.phase_history(result.snapshots, result.snapshot_points, dims, 0, result.timeline.phases),
                     figdir / "phase_history.png")
        frames = animation.evolution_frames(result.snapshots, result.snapshot_points, dims, result.seeds)
        animation.write_gif(frames, figdir / "evolution.gif")
        animation.write_mp4(frames, figdir / "evolution.mp4")

    edits = evaluate_interventions(cfg, result.objective, models, rows, figdir)

    anchored = [r for r in rows if r.get("anchored")]
    summary: dict[str, Any] = {
        "experiment": cfg.name, "upstream": cfg.upstream, "steps": result.timeline.steps,
        "seeds": rows, "anchored_seeds": len(anchored) if rows and "anchored" in rows[0] else None,
        "criterion": (f"12 hues in order around dims {tuple(cfg.evaluate.hue_dims)} and " if cfg.evaluate.hue_order else "")
        + f"cos({cfg.evaluate.concept}, anchor) ≥ {cfg.evaluate.min_cosine}",
    }
    if result.decisions:
        summary["reactive"] = [vars(d) for d in result.decisions]
    if edits:
        summary["interventions"] = edits
        summary["pareto_seeds"] = pareto_seeds(rows, edits)
    write_report(path, cfg, rows, summary)
    return summary


def evaluate_interventions(cfg: ExperimentConfig, objective, models, rows: list[dict], figdir: Path) -> dict[str, Any]:
    """Run every configured edit on every seed; per-colour tables, selectivity, figures."""
    out: dict[str, Any] = {}
    seeds = [r["seed"] for r in rows]
    for spec in cfg.interventions:
        plan = make_plan(spec, objective.concepts, cfg.model.latent_dim)
        concept = next((c for c in objective.concepts if c.name == spec.concept), None)
        after = plan.reconstruct(models)
        res = evaluate_edit(stacked(models), after, concept, spec.k)
        table = named_error_table(res["named_before"], res["named_after"], seeds)
        out[spec.name] = {
            "method": spec.method, "concept": spec.concept, "dims": list(plan.dims) if plan.dims else None,
            "falloff": spec.falloff, "k": spec.k,
            "selectivity": [float(x) for x in res["selectivity"]],
            "selectivity_median": float(res["selectivity"].median()),
            "named_after": {n: [float(x) for x in res["named_after"][:, j]] for j, n in enumerate(NAMES)},
            "table": table,
            "grid_mse": {k: [float(x) for x in res[k]] for k in ("hsv_grid_before", "hsv_grid_after", "rgb_grid_before", "rgb_grid_after")},
        }
        figures.save(figures.hue_error_curves(res["hue_after"], (0.25, 0.5, 0.75, 1.0), f"{spec.name}: error vs hue (s = 1)"),
                     figdir / f"{spec.name}_hue_error.png")
        with torch.no_grad():
            outputs = after(named_rgb())
        figures.save(figures.reconstruction_grid(named_rgb(), outputs, NAMES, seeds), figdir / f"{spec.name}_reconstruction.png")
    return out


def pareto_seeds(rows: list[dict], edits: dict[str, Any]) -> list[int]:
    """Seeds on the Pareto front of (val reconstruction, val anchoring loss, −selectivity of the first edit)."""
    import numpy as np

    first = next(iter(edits.values()))
    obj = np.array([[r["val_mse"], r.get("val_anchor_loss", 0.0), -first["selectivity"][i]] for i, r in enumerate(rows)])
    return [rows[i]["seed"] for i in pareto_front(obj)]


def seed_table(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    keys = [k for k in ("seed", "anchor_cos", "hue_order", "val_mse", "val_anchor_loss", "anchored") if rows and k in rows[0]]
    return keys, [[r[k] for k in keys] for r in rows]


EXPECTED = {
    "ablate": "Ablation cuts whole latent dims. If the concept shares its axis with its opposite colour "
              "(red at +dim 0, cyan at −dim 0, as in a plain anchored model) both lose that dim and both break "
              "(≈1/3 each, the MSE of a random colour): expected, and the reason the isolated model reserves "
              "red's opposite side (anti-anchor) and clears its dim for it (anti-subspace).",
    "suppress": "Suppression removes the concept's component only where its cosine is positive, so the far "
                "hemisphere (cyan for red) is untouched; the fully suppressed colour decodes to the decoder's "
                "fallback (about mid grey, MSE(red, grey) = 1/4).",
}


def intervention_sections(summary: dict[str, Any], figs: Path) -> list[tuple[str, str]]:
    sections = []
    for name, e in summary.get("interventions", {}).items():
        rows = [[r["colour"], r["before"], r["after"], r["after_min"], r["after_max"]] for r in e["table"]]
        note = EXPECTED.get(e["method"], "")
        body = (f"<p>{e['method']} {('of ' + e['concept']) if e['concept'] else ''} {('dims ' + str(e['dims'])) if e['dims'] else ''}; "
                f"selectivity R² vs similarity^{e['k']:g}: median {e['selectivity_median']:.3f} "
                f"(per seed: {', '.join(f'{x:.2f}' for x in e['selectivity'])})</p><p><i>{note}</i></p>"
                + html.table_html(["colour", "MSE before (median)", "after (median)", "after min", "after max"], rows)
                + html.image_html(figs / f"{name}_hue_error.png", "error vs hue")
                + html.image_html(figs / f"{name}_reconstruction.png", "output colour (background) vs true colour (inset)"))
        sections.append((f"Intervention: {name}", body))
    return sections


def write_report(path: Path, cfg: ExperimentConfig, rows: list[dict], summary: dict[str, Any]) -> None:
    header, body = seed_table(rows)
    figs = path / "figures"
    verdict = (f"<p><b>{summary['anchored_seeds']} of {len(rows)} seeds anchored</b> ({summary['criterion']}).</p>"
               if summary.get("anchored_seeds") is not None else "")
    sections = [
        ("Overview", f"<p>{cfg.description}</p><p>upstream experiment: {cfg.upstream or '–'}; steps: {summary['steps']}; "
                     f"seeds: {cfg.train.seed}…{cfg.train.seed + cfg.train.seeds - 1}</p>{verdict}"),
        ("Per-seed results", html.table_html(header, body)),
        ("Latent space (axis-aligned slices; × marks the anchor)", html.image_html(figs / "latent_slices.png", "latent slices")),
        ("Loss curves", html.image_html(figs / "loss_curves.png", "loss curves")),
        ("Schedule", html.image_html(figs / "schedule.png", "schedule")),
        *([("Phase history (seed %d)" % cfg.train.seed, html.image_html(figs / "phase_history.png", "phase history")),
           ("Latent evolution", html.image_html(figs / "evolution.gif", "latent evolution", mime="image/gif"))]
          if (figs / "evolution.gif").is_file() else []),
        *intervention_sections(summary, figs),
        ("Resolved config", f"<pre>{html.html.escape(cfg.to_toml())}</pre>"),
    ]
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
