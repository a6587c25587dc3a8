"""Edits on a finished transformer run: suppress/ablate at the anchored sites (hooks), and a
weight deletion that takes the anchor direction out of the residual stream for good."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from anchoring import runs
from anchoring.config import InterventionConfig
from anchoring.control.surgery import project_out, residual_component
from anchoring.errors import AnchoringError
from anchoring.kinds.arms import write_arms
from anchoring.kinds.base import EditResult, intervention_rows
from anchoring.kinds.transformer import evaluate as ev
from anchoring.kinds.transformer.model import TransformerRun
from anchoring.kinds.transformer.training import build_sequence_objective
from anchoring.report import html

GROUPS = ("red answer", "red-ish", "no red")


def named_sites(spec: InterventionConfig) -> list[str]:
    """The sites an edit names (`sites`, or one `site`); none means every anchored site. "latent" is the
    colour models' default site, so it names nothing here."""
    if spec.sites is not None:
        return list(spec.sites)
    return [] if spec.site in (None, "latent") else [spec.site]


def _targets(run: TransformerRun, spec: InterventionConfig, model) -> list:
    """(site, direction) pairs of the concept's anchored sites (all of them, or the one `--site` names)."""
    cfg = run.config
    objective = build_sequence_objective(cfg, model)
    if spec.concept is None:
        raise AnchoringError("a transformer edit needs --concept (its anchored direction)")
    anchors = objective.anchors(spec.concept)
    if not anchors:
        known = sorted({t.concept for t in objective.terms if t.kind == "anchor" and t.concept})
        raise AnchoringError(f"concept {spec.concept!r} is not anchored in this run (anchored: {', '.join(known) or 'none'})")
    wanted = named_sites(spec)
    if not wanted:
        return anchors
    chosen = [(s, v) for s, v in anchors if s.module in wanted]
    missing = sorted(set(wanted) - {s.module for s, _ in chosen})
    if missing:
        raise AnchoringError(f"site(s) {', '.join(missing)} not anchored (anchored: {', '.join(s.module for s, _ in anchors)})")
    return chosen


def _accuracy_rows(run: TransformerRun, spec: InterventionConfig) -> list[dict[str, Any]]:
    """Per (arm, seed): accuracy by redness group before and after the edit. The control has no
    anchor, so it gets the same edit along a post-hoc direction (difference of means)."""
    cfg, tc = run.config, run.config.transformer
    lang = run.language
    sets = ev.eval_lines(lang, tc.eval_lines, tc.reddest)
    rows = []
    for arm, models in run.arms.items():
        for seed, model in zip(run.seeds, models):
            targets = _targets(run, spec, model)
            if arm != "anchored":
                seen = ev.probe(model, lang, cfg.language.context, [s for s, _ in targets])
                targets = [(s, ev.mean_difference(seen, lang, s, tc.reddest)) for s, _ in targets]
            before = ev.accuracy_table(lang, sets, ev.score(model, lang, sets, cfg.language.context), tc.reddest, tc.redish)
            with ev.edited(model, targets, spec.method):
                after = ev.accuracy_table(lang, sets, ev.score(model, lang, sets, cfg.language.context), tc.reddest, tc.redish)
            rows.append({"arm": arm, "seed": seed, "direction": "anchor" if arm == "anchored" else "difference of means",
                         "sites": [s.module for s, _ in targets],
                         **{f"{g} before": before[g] for g in GROUPS}, **{f"{g} after": after[g] for g in GROUPS}})
    return rows


def intervention_lines(path: Path) -> list[Any]:
    """The table `intervene` printed, from the summary.json it wrote in `path`."""
    found = intervention_rows(path, "direction")
    return [] if found is None else [_table(f"{found[0]}: exact match by redness", found[1])]


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for h in ("arm", "seed", *[f"{g}: before → after" for g in GROUPS]):
        table.add_column(h, justify="right")
    for r in rows:  # delete copies the control unchanged: its row is a reference, not an edit that did nothing
        arm = r["arm"] if r.get("edited", True) else f"{r['arm']} (unedited)"
        table.add_row(arm, str(r["seed"]), *[f"{r[f'{g} before']:.3f} → {r[f'{g} after']:.3f}" for g in GROUPS])
    return table


def refuse_unused(spec: InterventionConfig, in_config: bool = False) -> None:
    """A transformer edit acts on the concept's anchor at full strength: options it would not use are
    refused rather than recorded in the edit's summary as if they had been applied. `in_config`: name
    the config keys of an `[[interventions]]` entry instead of the command's flags."""
    default = InterventionConfig(name=spec.name, method=spec.method)
    for key in ("falloff", "dims", "k"):
        if getattr(spec, key) != getattr(default, key):
            where = f"intervention {spec.name!r}: {key}" if in_config else f"--{key}"
            raise AnchoringError(f"{where} does not apply to 'transformer' runs: their edits remove the concept's anchor "
                                 f"at full strength (use {'concept' if in_config else '--concept'})")


def intervene(run: TransformerRun, spec: InterventionConfig) -> EditResult:
    """Suppress or ablate the concept's direction at its anchored sites; exact match split by redness."""
    if spec.method not in ("suppress", "ablate"):
        raise AnchoringError(f"a 'transformer' run supports --method suppress or ablate, not {spec.method!r}")
    refuse_unused(spec)
    if not runs.SAFE_NAME.match(spec.name):
        raise AnchoringError(f"--name {spec.name!r}: use letters, digits and _.,+=- only (it names a folder inside the run)")
    out = run.path / "interventions" / spec.name
    runs.check_writable(out)
    rows = _accuracy_rows(run, spec)
    sites = list(dict.fromkeys(x for r in rows for x in r["sites"]))  # the spec as run: "latent" is the colour default
    ran = spec.model_dump() | {"site": sites[0] if len(sites) == 1 else None, "sites": sites}
    runs.write_json(out / "summary.json", {"spec": ran, "sites": sites, "rows": rows})
    return EditResult(spec.name, [_table(f"{spec.name}: exact match by redness", rows), f"wrote {out}"], [out], {"rows": rows})


def remove_direction(model, direction: torch.Tensor):
    """A copy whose residual stream cannot carry `direction` (`control.surgery.project_out` over the
    model's embeddings and residual writers). With the state renormalised after every block and a
    per-dimension step α, the component stays exactly zero when `direction` is a basis axis (the
    anchors here); for any other direction α mixes a little back in, which `residual_component` measures."""
    embeddings, writers = model.residual_writers()
    return project_out(model, direction, embeddings, writers)


def residual_sites(model) -> list[str]:
    """The residual-stream states of a normalised transformer: after the embedding and each block."""
    return ["embed", *[f"blocks.{i}" for i in range(len(model.blocks))]]


def delete(run: TransformerRun, spec: InterventionConfig, out: Path) -> EditResult:
    """Write a run whose anchored arm has the concept's direction removed from its weights; the
    control arm is copied unchanged (it has no anchor to remove)."""
    if spec.method != "ablate":
        raise AnchoringError(f"delete on a 'transformer' run removes the anchor direction (--method ablate), not {spec.method!r}")
    refuse_unused(spec)
    if "anchored" not in run.arms:
        raise AnchoringError("this transformer run has no anchored arm to delete from")
    out = runs.new_run_dir(run.config.name, out, resumable=False)
    runs.check_stageable(out)  # staged below: checked before any work
    cfg = run.config
    edited: dict[str, list] = {arm: list(ms) for arm, ms in run.arms.items()}
    lang = run.language
    probe_tokens = lang.batch(4, cfg.language.context, torch.Generator().manual_seed(0)).inputs
    leftover = []
    for i, model in enumerate(run.arms["anchored"]):
        residual = set(residual_sites(model))  # a key-space anchor of a one-head model is as wide, but no residual direction
        directions = [v for s, v in _targets(run, spec, model) if s.head is None and s.module in residual]
        if not directions:
            raise AnchoringError("delete removes residual-stream directions; this concept is anchored only on per-head sites")
        m = model
        for v in directions:
            m = remove_direction(m, v)
        edited["anchored"][i] = m
        leftover.append(max(residual_component(m, v, probe_tokens, residual_sites(m)) for v in directions))
    tc = cfg.transformer
    sets = ev.eval_lines(lang, tc.eval_lines, tc.reddest)
    rows = []
    for arm, models in edited.items():
        for seed, m, orig in zip(run.seeds, models, run.arms[arm]):
            b = ev.accuracy_table(lang, sets, ev.score(orig, lang, sets, cfg.language.context), tc.reddest, tc.redish)
            a = ev.accuracy_table(lang, sets, ev.score(m, lang, sets, cfg.language.context), tc.reddest, tc.redish)
            rows.append({"arm": arm, "seed": seed, "edited": arm == "anchored",
                         **{f"{g} before": b[g] for g in GROUPS}, **{f"{g} after": a[g] for g in GROUPS}})
    with runs.staged(out) as tmp:  # all of it or nothing under `out`
        runs.write_atomic(tmp / runs.CONFIG, (run.path / runs.CONFIG).read_text())
        runs.write_atomic(tmp / runs.ARCH, (run.path / runs.ARCH).read_text())
        write_arms(tmp, {(arm, seed): m for arm, ms in edited.items() for seed, m in zip(run.seeds, ms)}, "anchoring-transformer-1")
        edit = {"source": str(run.path.resolve()), "method": "delete-direction", "concept": spec.concept,
                "max_residual_component": leftover}
        previous = runs.read_json(run.path / "edit.json").get("lineage", []) if (run.path / "edit.json").is_file() else []
        runs.write_json(tmp / "edit.json", {**edit, "lineage": [*previous, edit]})
        body = html.table_html(["arm", "seed", "edited", *[f"{g} {w}" for g in GROUPS for w in ("before", "after")]],
                               [[r["arm"], r["seed"], r["edited"], *[r[f"{g} {w}"] for g in GROUPS for w in ("before", "after")]]
                                for r in rows])
        runs.write_atomic(tmp / runs.REPORT, html.page(f"anchoring: {cfg.name} (deleted {spec.concept})", [
            ("Edit", f"<p>The anchor direction of {html.html.escape(spec.concept or '')} was projected out of the embeddings and "
                     f"of every residual-writing matrix of the anchored arm (largest remaining |h·v| per seed: "
                     f"{', '.join(f'{x:.2e}' for x in leftover)}).</p>"),
            ("Exact match by redness", body)]))
        summary = {"experiment": cfg.name, "kind": "transformer", "edit": edit, "edit_rows": rows}
        runs.write_json(tmp / runs.SUMMARY, summary)
    copied = sorted({r["arm"] for r in rows if not r["edited"]})
    note = [f"{', '.join(copied)}: copied unedited (no anchor to remove); its rows are a reference"] if copied else []
    return EditResult("delete", [_table(f"delete {spec.concept}: exact match by redness", rows), *note,
                                 f"largest |h·v| left in the residual stream: {max(leftover):.2e}", f"edited run: {out}"],
                      [out], summary)
