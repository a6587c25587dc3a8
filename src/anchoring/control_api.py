"""Control commands on a finished run: intervene, delete, relearn. The CLI calls these."""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from anchoring import api, runs
from anchoring.config import InterventionConfig
from anchoring.control import ablate_direction
from anchoring.control.plan import make_plan
from anchoring.control.relearn import concept_samples, post_hoc_direction
from anchoring.control.relearn import relearn as finetune
from anchoring.domains.colour import NAMES, named_rgb, rgb_grid
from anchoring.errors import AnchoringError
from anchoring.evaluate.control import evaluate_edit, named_error_table, stacked
from anchoring.report import figures
from anchoring.runs import Run
from anchoring.train.checkpoint import atomic_save
from anchoring.train.objective import build_objective


@dataclass
class EditResult:
    name: str
    table: list[dict]
    selectivity: list[float]
    files: list[Path]


def _concept(run: Run, name: str | None):
    objective = build_objective(run.config)
    concepts = {c.name: c for c in objective.concepts}
    if name is not None and name not in concepts:
        raise AnchoringError(f"run has no concept {name!r} (has: {', '.join(concepts) or 'none'})")
    return objective, concepts.get(name) if name else None


def _latent_dim(run: Run) -> int:
    return int(getattr(run.models[0], "latent_dim", run.config.model.latent_dim))


def _table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def intervene(run: Run, spec: InterventionConfig) -> EditResult:
    """Evaluate one edit on every seed; write CSV + figures under RUN/interventions/<name>/."""
    objective, concept = _concept(run, spec.concept)
    plan = make_plan(spec, objective.concepts, _latent_dim(run))
    after = plan.reconstruct(run.models)
    res = evaluate_edit(stacked(run.models), after, concept, spec.k)
    table = named_error_table(res["named_before"], res["named_after"], run.seeds)
    per_seed = [{"seed": s, **{n: float(res["named_after"][i, j]) for j, n in enumerate(NAMES)},
                 "hsv_grid_mse": float(res["hsv_grid_after"][i]), "rgb_grid_mse": float(res["rgb_grid_after"][i]),
                 "selectivity": float(res["selectivity"][i])} for i, s in enumerate(run.seeds)]
    out = run.path / "interventions" / spec.name
    runs.write_atomic(out / "colours.csv", _table_csv(table))
    runs.write_atomic(out / "per_seed.csv", _table_csv(per_seed))
    runs.write_atomic(out / "spec.json", spec.model_dump_json(indent=2))
    figures.save(figures.hue_error_curves(res["hue_after"], (0.25, 0.5, 0.75, 1.0), f"{spec.name}: error vs hue"), out / "hue_error.png")
    with torch.no_grad():
        outputs = after(named_rgb())
    figures.save(figures.reconstruction_grid(named_rgb(), outputs, NAMES, run.seeds), out / "reconstruction.png")
    files = [out / "colours.csv", out / "per_seed.csv", out / "hue_error.png", out / "reconstruction.png"]
    if spec.method in ("suppress", "repel"):
        shape = plan.edit_activation().shape
        figures.save(figures.intervention_lobes({spec.falloff: shape}, spec.method), out / "lobes.png")
        figures.save(figures.strength_curves({spec.falloff: shape}), out / "strength.png")
        files += [out / "lobes.png", out / "strength.png"]
    return EditResult(spec.name, table, [float(x) for x in res["selectivity"]], files)


def delete(run: Run, spec: InterventionConfig, out: Path) -> EditResult:
    """Write an edited copy of the run (ablate or prune) that `load_run` opens like any other."""
    if spec.method not in ("ablate", "prune"):
        raise AnchoringError(f"delete takes --method ablate or prune, not {spec.method!r}")
    objective, concept = _concept(run, spec.concept)
    plan = make_plan(spec, objective.concepts, _latent_dim(run))
    if out.exists() and any(out.iterdir()):
        raise AnchoringError(f"{str(out)!r} already exists and is not empty")
    edited = plan.edit_models(run.models)
    res = evaluate_edit(stacked(run.models), stacked(edited), concept, spec.k)
    table = named_error_table(res["named_before"], res["named_after"], run.seeds)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.path / runs.CONFIG, out / runs.CONFIG)
    arch = json.loads((run.path / runs.ARCH).read_text()) if (run.path / runs.ARCH).is_file() else runs.architecture(run.config)
    arch["latent_dim"] = int(getattr(edited[0], "latent_dim", arch["latent_dim"]))
    runs.write_atomic(out / runs.ARCH, json.dumps(arch, indent=2))
    stacked_params = {f"param.{k}": torch.stack([m.state_dict()[k] for m in edited]) for k in edited[0].state_dict()}
    atomic_save(stacked_params, out / "checkpoint.safetensors", {"format": "anchoring-checkpoint-1", "step": "0"})
    edit = {"source": str(run.path), "method": spec.method, "concept": spec.concept, "dims": list(plan.dims or [])}
    runs.write_atomic(out / "edit.json", json.dumps(edit, indent=2))
    runs.write_atomic(out / "colours.csv", _table_csv(table))
    summary = dict(run.summary or {})
    summary.update({"edit": edit, "edit_table": table, "edit_selectivity": [float(x) for x in res["selectivity"]]})
    runs.write_atomic(out / runs.SUMMARY, json.dumps(summary, indent=2))
    return EditResult(spec.name, table, [float(x) for x in res["selectivity"]], [out])


@dataclass
class RelearnResult:
    rows: list[dict[str, Any]]  # model, K, per-seed steps-to-recover
    path: Path


def relearn(run: Run, concept_name: str, samples: Sequence[int], steps: int, *, lr: float = 0.01, retain: int = 0,
            threshold: float = 0.01, baseline: bool = True, progress=None) -> RelearnResult:
    """Delete the concept (ablate its dims), then fine-tune on K concept samples; same for a post-hoc baseline."""
    if any(k < 1 for k in samples) or steps < 1:
        raise AnchoringError("--samples and --steps must be positive integers")
    objective, concept = _concept(run, concept_name)
    if concept is None or concept.anchor is None:
        raise AnchoringError(f"concept {concept_name!r} has no anchor to delete")
    plan = make_plan(InterventionConfig(name="relearn", method="ablate", concept=concept_name), objective.concepts, _latent_dim(run))
    pool = rgb_grid(16)
    probe = pool[concept.labeller.exact(pool).bool()]
    out = run.path / "relearn" / concept_name
    models = {"anchored": plan.edit_models(run.models)}
    if baseline:
        base_dir = out / "baseline-run"
        if not (base_dir / runs.SUMMARY).is_file():
            if base_dir.exists():
                shutil.rmtree(base_dir)
            cfg = run.config
            from anchoring.train.objective import build_timeline

            tl = build_timeline(cfg, objective)
            lr_keys = tl.tracks["lr"].key_values()
            sched = "STEP,lr\n" + "".join(f"{int(t)},{v:.10g}\n" for t, v in lr_keys)
            plain = cfg.model_copy(update={"name": f"{cfg.name}-unanchored", "concepts": [], "terms": [], "interventions": [],
                                          "schedule": sched, "evaluate": cfg.evaluate.model_copy(update={"concept": None})})
            api.run(plain, base_dir, progress=progress)
        base = runs.load_run(base_dir)
        edited = []
        for m in base.models:
            d = post_hoc_direction(m.encoder, concept.labeller, pool)
            edited.append(ablate_direction(m, d, site="latent"))
        models["post-hoc"] = edited
    rows, curves = [], []
    for name, ms in models.items():
        for k in samples:
            recover = []
            for seed, m in zip(run.seeds, ms):
                x = concept_samples(concept.labeller, pool, k, seed=seed * 1000 + k)
                keep = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:retain]] if retain else None
                curve = finetune(m, x, probe, steps, lr=lr, retain=keep)
                recover.append(curve.steps_to(threshold))
                curves.extend({"model": name, "K": k, "seed": seed, "step": t, "error": float(e)} for t, e in enumerate(curve.errors))
            rows.append({"model": name, "K": k, "steps_to_recover": recover,
                         "start_error": float(torch.tensor([c["error"] for c in curves if c["model"] == name and c["K"] == k and c["step"] == 0]).median())})
    runs.write_atomic(out / "curves.csv", _table_csv(curves))
    runs.write_atomic(out / "summary.json", json.dumps({"concept": concept_name, "threshold": threshold, "steps": steps,
                                                         "lr": lr, "retain": retain, "rows": rows}, indent=2))
    figures.save(figures.relearn_curves(curves, threshold), out / "relearn.png")
    return RelearnResult(rows, out)
