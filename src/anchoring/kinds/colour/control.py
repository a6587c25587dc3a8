"""Control commands on a finished colour run: intervene, delete, relearn.

An edited run (`delete`) records what was done to it in `edit.json`; concepts of such a run
are re-indexed through every pruning in its lineage, so a later edit hits the concept it
names, and a concept whose dims were removed is refused with the reason.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from rich.table import Table

from anchoring import runs
from anchoring.anchor import Concept
from anchoring.config import InterventionConfig
from anchoring.control import ablate_direction
from anchoring.control.relearn import diverging
from anchoring.control.relearn import relearn as finetune
from anchoring.domains.colour import NAMES, named_rgb, rgb_grid
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import median
from anchoring.kinds.base import EditResult
from anchoring.kinds.colour.edits import evaluate_edit, named_error_table, stacked
from anchoring.kinds.colour.model import ColourRun
from anchoring.kinds.colour.objective import build_objective
from anchoring.kinds.colour.plan import concept_samples, make_plan, post_hoc_direction
from anchoring.kinds.colour.sites import check_edit_site, site_width
from anchoring.report import figures, html
from anchoring.schedule.dopesheet import dopesheet_rows
from anchoring.train.checkpoint import FORMAT, atomic_save

EDIT = "edit.json"


def edit_lineage(path: Path) -> list[dict[str, Any]]:
    """Every edit between the trained run and `path`, oldest first."""
    p = path / EDIT
    return list(runs.read_json(p).get("lineage", [])) if p.is_file() else []


def _reindex(concept: Concept, removed: Sequence[int], width: int) -> Concept | None:
    """The concept after dims `removed` were pruned from a `width`-dim latent; None if it lived there."""
    keep = [d for d in range(width) if d not in set(removed)]
    if concept.anchor is not None and any(concept.anchor[d] != 0 for d in removed):
        return None
    if concept.dims is not None and any(d in set(removed) for d in concept.dims):
        return None
    anchor = tuple(concept.anchor[d] for d in keep) if concept.anchor is not None else None
    dims = tuple(keep.index(d) for d in concept.dims) if concept.dims is not None else None
    return replace(concept, anchor=anchor, dims=dims)


def run_concepts(run: ColourRun) -> tuple[list[Concept], dict[str, str]]:
    """The run's concepts as they stand after its edits, and why any concept is gone."""
    concepts = build_objective(run.config).concepts
    width = run.config.model.latent_dim
    gone: dict[str, str] = {}
    for e in edit_lineage(run.path):
        if e["method"] == "prune":
            kept = []
            for c in concepts:
                r = _reindex(c, e["dims"], width)
                if r is None:
                    gone[c.name] = f"its dims were pruned from this run (dims {e['dims']} removed from {e['source']!r})"
                else:
                    kept.append(r)
            concepts, width = kept, width - len(e["dims"])
    return concepts, gone


def _concept(run: ColourRun, name: str | None) -> tuple[list[Concept], Concept | None]:
    concepts, gone = run_concepts(run)
    by_name = {c.name: c for c in concepts}
    if name is not None and name not in by_name:
        if name in gone:
            raise AnchoringError(f"concept {name!r} cannot be edited: {gone[name]}")
        raise AnchoringError(f"run has no concept {name!r} (has: {', '.join(by_name) or 'none'})")
    return concepts, by_name.get(name) if name else None


def _check_site(run: ColourRun, site: str) -> None:
    """The site must exist and carry the latent (its width is the model's latent width)."""
    check_edit_site("--site", site, site_width(run.models[0], site), run.latent_dim)


def _table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def colour_table(title: str, rows: list[dict], selectivity: list[float], k: float | None = None) -> list[Any]:
    """The per-colour table and the selectivity line; `k` (the exponent of the similarity the R² is
    taken against) is named, since one edit scored at two k gives two selectivities."""
    table = Table(title=title)
    for h in ("colour", "before", "after (median)", "min", "max"):
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(r["colour"], f"{r['before']:.4f}", f"{r['after']:.4f}", f"{r['after_min']:.4f}", f"{r['after_max']:.4f}")
    at = f" (k = {k:g})" if k is not None else ""
    return [table, f"selectivity R²{at} per seed: {', '.join(f'{x:.3f}' for x in selectivity)} (median {median(selectivity):.3f})"]


def intervene(run: ColourRun, spec: InterventionConfig) -> EditResult:
    """Evaluate one edit on every seed; write CSV + figures under RUN/interventions/<name>/."""
    if not runs.SAFE_NAME.match(spec.name):
        raise AnchoringError(f"--name {spec.name!r}: use letters, digits and _.,+=- only (it names a folder inside the run)")
    concepts, concept = _concept(run, spec.concept)
    _check_site(run, spec.site)
    plan = make_plan(spec, concepts, run.latent_dim)
    out = run.path / "interventions" / spec.name
    runs.check_stageable(out)  # staged below: checked before any work
    after = plan.reconstruct(run.models)
    res = evaluate_edit(stacked(run.models), after, concept, spec.k)
    table = named_error_table(res["named_before"], res["named_after"], run.seeds)
    per_seed = [{"seed": s, **{n: float(res["named_after"][i, j]) for j, n in enumerate(NAMES)},
                 "hsv_grid_mse": float(res["hsv_grid_after"][i]), "rgb_grid_mse": float(res["rgb_grid_after"][i]),
                 "selectivity": float(res["selectivity"][i])} for i, s in enumerate(run.seeds)]
    names = ["colours.csv", "per_seed.csv", "hue_error.png", "reconstruction.png"]
    with torch.no_grad():
        outputs = after(named_rgb())
    with runs.staged(out, replace=True) as tmp:  # all of it or nothing, and nothing left from an earlier edit of this name
        runs.write_atomic(tmp / "colours.csv", _table_csv(table))
        runs.write_atomic(tmp / "per_seed.csv", _table_csv(per_seed))
        runs.write_atomic(tmp / "spec.json", spec.model_dump_json(indent=2))
        figures.save(figures.hue_error_curves(res["hue_after"], (0.25, 0.5, 0.75, 1.0), f"{spec.name}: error vs hue"),
                     tmp / "hue_error.png")
        figures.save(figures.reconstruction_grid(named_rgb(), outputs, NAMES, run.seeds), tmp / "reconstruction.png")
        if spec.method in ("suppress", "repel"):
            shape = plan.edit_activation().shape
            figures.save(figures.intervention_lobes({spec.falloff: shape}, spec.method), tmp / "lobes.png")
            figures.save(figures.strength_curves({spec.falloff: shape}), tmp / "strength.png")
            names += ["lobes.png", "strength.png"]
    files = [out / n for n in names]
    selectivity = [float(x) for x in res["selectivity"]]
    return EditResult(spec.name, [*colour_table(f"{spec.name}: per-colour MSE", table, selectivity, spec.k), f"wrote {out}"], files,
                      {"table": table, "selectivity": selectivity})


def delete(run: ColourRun, spec: InterventionConfig, out: Path) -> EditResult:
    """Write an edited copy of the run (ablate or prune) that `load_run` opens like any other."""
    if spec.method not in ("ablate", "prune"):
        raise AnchoringError(f"delete takes --method ablate or prune, not {spec.method!r}")
    concepts, concept = _concept(run, spec.concept)
    _check_site(run, spec.site)
    plan = make_plan(spec, concepts, run.latent_dim)
    out = runs.new_run_dir(run.config.name, out, resumable=False)
    runs.check_stageable(out)  # staged below: checked before any work
    edited = plan.edit_models(run.models)
    res = evaluate_edit(stacked(run.models), stacked(edited), concept, spec.k)
    table = named_error_table(res["named_before"], res["named_after"], run.seeds)
    selectivity = [float(x) for x in res["selectivity"]]
    with runs.staged(out) as tmp:  # all of it or nothing under `out`
        runs.write_atomic(tmp / runs.CONFIG, (run.path / runs.CONFIG).read_text())
        arch = runs.read_json(run.path / runs.ARCH)
        arch["latent_dim"] = int(getattr(edited[0], "latent_dim", arch["latent_dim"]))
        runs.write_json(tmp / runs.ARCH, arch)
        stacked_params = {f"param.{k}": torch.stack([m.state_dict()[k] for m in edited]) for k in edited[0].state_dict()}
        atomic_save(stacked_params, tmp / "checkpoint.safetensors", {"format": FORMAT, "step": "0"})
        edit = {"source": str(run.path.resolve()), "method": spec.method, "concept": spec.concept, "dims": list(plan.dims or []),
                "k": spec.k}  # the selectivity's exponent: the same edit scores differently at another k
        runs.write_json(tmp / EDIT, {**edit, "lineage": [*edit_lineage(run.path), edit]})
        runs.write_atomic(tmp / "colours.csv", _table_csv(table))
        figures.save(figures.hue_error_curves(res["hue_after"], (0.25, 0.5, 0.75, 1.0), f"{spec.method}: error vs hue"),
                     tmp / "figures" / "hue_error.png")
        with torch.no_grad():
            outputs = stacked(edited)(named_rgb())
        figures.save(figures.reconstruction_grid(named_rgb(), outputs, NAMES, run.seeds), tmp / "figures" / "reconstruction.png")
        rows = [[r["colour"], r["before"], r["after"], r["after_min"], r["after_max"]] for r in table]
        sections = [("Edit", f"<p>{spec.method} of {html.html.escape(spec.concept or 'dims')} (dims {list(plan.dims or [])}) "
                             f"applied to {html.html.escape(str(run.path))}; selectivity R² (k = {spec.k:g}) median "
                             f"{median(selectivity):.3f}</p>"),
                    ("Per-colour MSE", html.table_html(["colour", "before (median)", "after (median)", "after min", "after max"], rows)),
                    ("Error vs hue", html.image_html(tmp / "figures" / "hue_error.png", "error vs hue")),
                    ("Reconstructions", html.image_html(tmp / "figures" / "reconstruction.png", "reconstructions"))]
        runs.write_atomic(tmp / runs.REPORT, html.page(f"anchoring: {run.config.name} ({spec.method})", sections))
        summary = {"experiment": run.config.name, "kind": "colour", "seeds": [], "edit": edit, "edit_table": table,
                   "edit_selectivity": selectivity}
        runs.write_json(tmp / runs.SUMMARY, summary)
    return EditResult(spec.name, [*colour_table(f"{spec.method}: per-colour MSE", table, selectivity, spec.k), f"edited run: {out}"],
                      [out], summary)


def median_steps(got: Sequence[int | None], steps: int) -> str:
    """Median steps to recover over seeds, where a seed that never recovered (None) ranks above every
    count: with seeds [8, never] in 10 steps the median is "> 10", not a made-up 9.5."""
    med = median([s if s is not None else math.inf for s in got], rank_infinite=True)
    return f"{med:g}" if med <= steps else f">{steps}"


def relearn(run: ColourRun, concept: str = "red", samples: Sequence[int] = (1, 4, 16, 64), steps: int = 200, *,
            lr: float = 0.01, retain: int = 0, threshold: float = 0.01, baseline: bool = True, progress=None,
            eval_chars: int | None = None, repair_steps: int | None = None, repair_lr: float | None = None,
            distil_steps: int | None = None, distil_noise: float | None = None, distil_lr: float | None = None,
            attack_unedited: bool | None = None) -> EditResult:
    """Delete the concept (ablate its dims), then fine-tune on K concept samples; same for a post-hoc baseline."""
    if eval_chars is not None:
        raise AnchoringError("--eval-chars is for LM runs; a colour run's relearning error is scored on every colour of its concept")
    if repair_steps is not None or repair_lr is not None:
        raise AnchoringError("--repair-steps and --repair-lr are for LM runs; a colour run's deletion is attacked as it is")
    if distil_steps is not None or distil_noise is not None or distil_lr is not None:
        raise AnchoringError("--distil-steps, --distil-noise and --distil-lr are for LM runs; a colour run's deletion is "
                             "attacked as it is")
    if attack_unedited is not None:
        raise AnchoringError("--attack-unedited is for LM runs; a colour run's relearning is measured by steps to recover, "
                             "not by a share kept")
    from anchoring import lifecycle

    if not samples or any(k < 1 for k in samples) or steps < 1:
        raise AnchoringError("--samples and --steps must be positive integers")
    if not (math.isfinite(lr) and lr > 0):
        raise AnchoringError(f"--lr must be a positive number, got {lr}")
    if retain < 0:
        raise AnchoringError(f"--retain must be ≥ 0, got {retain}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise AnchoringError(f"--threshold must be a number ≥ 0, got {threshold}")
    concepts, c = _concept(run, concept)
    if c is None or c.anchor is None:
        raise AnchoringError(f"concept {concept!r} has no anchor to delete")
    pool = rgb_grid(16)
    available = int((c.labeller.probability(pool) > 0).sum())
    if max(samples) > available:
        raise AnchoringError(f"--samples {max(samples)}: only {available} distinct {concept} colours can be drawn (of {len(pool)})")
    if retain > len(pool):
        raise AnchoringError(f"--retain {retain}: the pool has only {len(pool)} colours")
    plan = make_plan(InterventionConfig(name="relearn", method="ablate", concept=concept), concepts, run.latent_dim)
    probe = pool[c.labeller.exact(pool).bool()]
    out = run.path / "relearn" / concept
    runs.check_writable(out)
    models = {"anchored": plan.edit_models(run.models)}
    if baseline:
        base_dir = out / "baseline-run"
        if not (base_dir / runs.SUMMARY).is_file():
            cfg = run.config
            sched = lr_schedule(cfg.schedule)
            plain = cfg.model_copy(update={"name": f"{cfg.name}-unanchored", "concepts": [], "terms": [], "interventions": [],
                                          "description": f"The relearning attack's baseline for {cfg.name}: the same model, "
                                                         f"data, seeds and learning rates, with no concept and no regularizer.",
                                          "schedule": sched, "evaluate": cfg.evaluate.model_copy(update={"concept": ""})})  # "", not None: a None
            # is left out of config.toml, which then reads back as the default "red" on resume
            config = base_dir / runs.CONFIG
            if config.is_file() and config.read_text() == plain.to_toml():  # stopped part-way: go on from its checkpoint
                lifecycle.resume(base_dir, progress=progress)
            else:
                if base_dir.exists():
                    shutil.rmtree(base_dir)
                lifecycle.run(plain, base_dir, progress=progress)
        base = lifecycle.load_run(base_dir)
        models["post-hoc"] = [ablate_direction(m, post_hoc_direction(m.encoder, c.labeller, pool), site="latent")
                              for m in base.models]
    rows, curves = [], []
    for name, ms in models.items():
        for k in samples:
            recover, starts = [], []
            for seed, m in zip(run.seeds, ms):
                x = concept_samples(c.labeller, pool, k, seed=seed * 1000 + k)
                if retain:
                    x = torch.cat([x, pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:retain]]])
                with diverging(f"the relearning attack on {name} (seed {seed}, K = {k})", "give a smaller --lr"):
                    curve = finetune(m, lambda mm, x=x: (mm(x) - x).pow(2).mean(),
                                     lambda mm: (mm(probe).clamp(0, 1) - probe).pow(2).mean(), steps, lr=lr)
                recover.append(curve.steps_to(threshold))
                starts.append(float(curve.errors[0]))
                curves.extend({"model": name, "K": k, "seed": seed, "step": t, "error": float(e)} for t, e in enumerate(curve.errors))
            rows.append({"model": name, "K": k, "steps_to_recover": recover, "start_error": median(starts),
                         "start_errors": starts})
    # the summary goes first and comes back last: a stop between the files leaves no table that
    # `show` would print next to curves of another attack, only an attack it calls unfinished
    (out / runs.SUMMARY).unlink(missing_ok=True)
    runs.write_atomic(out / "curves.csv", _table_csv(curves))
    figures.save(figures.relearn_curves(curves, threshold), out / "relearn.png")
    summary = {"concept": concept, "threshold": threshold, "steps": steps, "lr": lr, "retain": retain, "rows": rows}
    runs.write_json(out / runs.SUMMARY, summary)
    return EditResult("relearn", [attack_table(summary), f"wrote {out}"], [out], summary)


def lr_schedule(schedule: str) -> str:
    """The dopesheet's STEP, learning-rate and data-extent columns, every row kept: the baseline then
    stretches to the run's steps exactly as the run did, so both follow the same learning rate and see
    the same data curriculum step by step (keys written out after stretching could land twice on one
    step, which a dopesheet refuses). The regularizers' columns go: the baseline has no terms."""
    rows = [r for _line, r in dopesheet_rows(schedule)]
    keep = [0] + [i for i, h in enumerate(rows[0]) if i and h.split(":")[0].strip() in ("lr", "extent")]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([[r[i] if i < len(r) else "" for i in keep] for r in rows])
    return out.getvalue()


def intervention_lines(path: Path) -> list[Any]:
    """The table `intervene` printed, from the tables it wrote in `path`."""
    if not ((path / "colours.csv").is_file() and (path / "per_seed.csv").is_file()):
        return []
    table = pd.read_csv(path / "colours.csv").to_dict("records")
    k = json.loads((path / "spec.json").read_text()).get("k") if (path / "spec.json").is_file() else None
    return colour_table(f"{path.name}: per-colour MSE", table, pd.read_csv(path / "per_seed.csv")["selectivity"].tolist(), k)


def attack_table(summary: dict[str, Any]) -> Table:
    """The relearning table from an attack's summary.json: what `anchoring relearn` printed, and
    what `anchoring show RUN/relearn/<concept>` prints again later."""
    steps, threshold = summary["steps"], summary["threshold"]
    table = Table(title=f"relearning {summary['concept']}: steps until MSE ≤ {threshold} (per seed; '-' = not within {steps}; "
                        f"'nd' = not deleted: MSE ≤ {threshold} before any step, left out of the median)")
    for h in ("model", "K", "start MSE", "median steps", "per seed"):
        table.add_column(h, justify="right")
    for r in summary["rows"]:
        got = r["steps_to_recover"]
        # a seed the deletion left at or under the threshold recovers "in 0 steps": that says the edit failed
        # there, not that relearning was instant, so it does not pull the median down
        starts = r.get("start_errors") or [math.inf] * len(got)
        kept = [s for s, e in zip(got, starts) if e > threshold]
        med = median_steps(kept, steps) if kept else "nd"
        table.add_row(r["model"], str(r["K"]), f"{r['start_error']:.3f}", med,
                      " ".join("nd" if e <= threshold else "-" if s is None else str(s) for s, e in zip(got, starts)))
    return table
