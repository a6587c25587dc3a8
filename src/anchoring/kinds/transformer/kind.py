"""The colour-transformer experiments (M3): train anchored and control arms, measure, edit, report.

Every (arm, seed) trains on its own resumable checkpoint under `arms/`, so an interrupted run
loses at most `checkpoint_every` steps of one model; `anchoring resume` picks up from there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save as st_save

from anchoring import runs
from anchoring.anchor import Capture
from anchoring.anchor.sequence import SequenceSite
from anchoring.domains.colour.labels import redness
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import mark_infinite, median, target_median, target_text
from anchoring.kinds.arms import refuse_repeated_seeds, train_each, write_arms
from anchoring.kinds.base import Kind
from anchoring.kinds.transformer import evaluate as ev
from anchoring.kinds.transformer import figures as sf
from anchoring.kinds.transformer.config import TransformerExperiment
from anchoring.kinds.transformer.control import named_sites, refuse_unused
from anchoring.kinds.transformer.training import (
    ArmResult,
    build_language,
    build_sequence_objective,
    build_sequence_timeline,
    build_transformer,
    train_arm,
)
from anchoring.models.ngpt import training_bytes
from anchoring.report import html
from anchoring.report.figures import save as save_fig
from anchoring.resources import check_fits
from anchoring.train.checkpoint import steps_done
from anchoring.train.skeleton import TrainingInterrupted
from anchoring.train.workers import job_progress, run_jobs_reporting, stop_asked

Progress = Callable[[int, int], None]
ARCH_KIND = "colour-transformer"


def arms(cfg: TransformerExperiment) -> list[str]:
    """'anchored' when there are terms; 'control' when asked for, or when nothing is anchored."""
    out = ["anchored"] if cfg.terms else []
    if cfg.transformer.control or not cfg.terms:
        out.append("control")
    return out


def memory_estimate(cfg: TransformerExperiment, vocab: int) -> int:
    """Bytes the run holds at once (`models.ngpt.training_bytes`): the models training side by side,
    and every finished one, held until the run is saved. Meant to refuse what cannot fit (a width of
    100,000 used to end in an allocation traceback, or a process the system kills half-way)."""
    t, lang = cfg.transformer, cfg.language
    jobs = len(arms(cfg)) * len(cfg.train.member_seeds())
    return training_bytes(vocab, t.width, t.layers, t.mlp_ratio * t.width, lang.batch_size * lang.context,
                          min(jobs, t.workers or os.cpu_count() or 1), jobs)


def validate(cfg: TransformerExperiment) -> int:
    """Everything checkable before training (the model builds, terms bind, the schedule fits, edits
    resolve); returns the run length in steps."""
    refuse_repeated_seeds(cfg.train.member_seeds())
    lang = build_language(cfg)
    check_fits(memory_estimate(cfg, lang.vocab_size), f"{cfg.name} (width {cfg.transformer.width}, "
               f"{cfg.transformer.layers} layers, batch {cfg.language.batch_size} × {cfg.language.context} tokens)",
               "lower transformer.width, transformer.layers, language.batch_size or language.context, "
               "transformer.workers, or the seeds")  # before the model below is built
    if cfg.transformer.reddest >= lang.n_colours:  # the evaluation's red group must leave colours that are not red
        raise AnchoringError(f"transformer.reddest = {cfg.transformer.reddest} needs fewer than the lattice's "
                             f"{lang.n_colours} colours (language.levels = {cfg.language.levels})")
    empty = [split for split in ("held-out", "seen") if not len(lang.mix_pairs(split))]  # both are scored after training
    if empty:
        raise AnchoringError(f"language.held_out = {cfg.language.held_out:g} leaves the {empty[0]} split of mix pairs "
                             f"empty; both are scored (use a share that keeps at least one pair on each side)")
    model = build_transformer(cfg, lang)
    objective = build_sequence_objective(cfg, model)
    steps = build_sequence_timeline(cfg, objective).steps
    with torch.no_grad(), Capture(model, objective.modules) as cap:  # each site gives what its term expects
        model(torch.zeros(1, min(8, cfg.language.context), dtype=torch.long))
        for t in objective.terms:
            t.site.read(cap.acts)
    names = [i.name for i in cfg.interventions]
    if len(set(names)) != len(names):
        raise AnchoringError("intervention names must be unique")
    for spec in cfg.interventions:
        if spec.method not in ("suppress", "ablate"):
            raise AnchoringError(f"intervention {spec.name!r}: a transformer supports suppress or ablate, not {spec.method!r}")
        refuse_unused(spec, in_config=True)  # options it would not use, refused as the command refuses them
        edit_targets(cfg, objective, spec)
    concept = cfg.evaluate.concept
    if concept and cfg.terms and not objective.anchors(concept):  # measured against axis 0 instead, without a word
        anchored = sorted({t.concept for t in objective.terms if t.kind == "anchor" and t.concept})
        raise AnchoringError(f"evaluate.concept {concept!r} is anchored by no term (anchored: {', '.join(anchored) or 'none'}); "
                             f"set evaluate.concept to the concept the alignment and the edits should measure")
    if cfg.interventions and not cfg.terms:
        raise AnchoringError("interventions need an anchored concept (this experiment has no terms)")
    return steps


def edit_targets(cfg: TransformerExperiment, objective, spec) -> list[tuple[SequenceSite, torch.Tensor]]:
    """(site, direction) pairs an intervention edits: the concept's anchored sites, or the ones it names."""
    anchors = objective.anchors(spec.concept) if spec.concept else []
    if not anchors:
        raise AnchoringError(f"intervention {spec.name!r}: concept {spec.concept!r} is not anchored by any term")
    wanted = named_sites(spec)
    if not wanted:
        return anchors
    by_module = {s.module: (s, v) for s, v in anchors}
    out = []
    for m in wanted:
        if m not in by_module:
            raise AnchoringError(f"intervention {spec.name!r}: {m!r} is not an anchored site (anchored: {', '.join(by_module)})")
        out.append(by_module[m])
    return out


def run(cfg: TransformerExperiment, path: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume: finished steps are read from `arms/`), then evaluate and write the run."""
    steps = validate(cfg)
    seeds = cfg.train.member_seeds()
    names = arms(cfg)
    lang = build_language(cfg)
    jobs = [(arm, seed) for seed in seeds for arm in names]
    ckpt = {job: path / "arms" / f"{job[0]}-seed{job[1]}.safetensors" for job in jobs}
    workers = min(len(jobs), cfg.transformer.workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    if workers > 1:
        _train_in_processes(cfg, jobs, ckpt, workers, steps, path, progress)
    results: dict[tuple[str, int], ArmResult] = train_each(  # in processes: each arm is finished and only loads here
        jobs, steps, lambda arm, seed, report: train_arm(cfg, seed, anchored=arm == "anchored", checkpoint=ckpt[arm, seed],
                                                         progress=report), progress, path, here=workers == 1)
    train_s = time.perf_counter() - t0
    summary = finish(cfg, path, lang, results, seeds, names)
    summary["timing"] = {"train_s": round(train_s, 3)}
    return summary


def _train_job(cfg: TransformerExperiment, arm: str, seed: int, checkpoint: Path) -> None:
    train_arm(cfg, seed, anchored=arm == "anchored", checkpoint=checkpoint, progress=job_progress((arm, seed)),
              should_stop=stop_asked)


def _train_in_processes(cfg: TransformerExperiment, jobs: list[tuple[str, int]], ckpt: dict, workers: int, steps: int,
                        path: Path, progress: Progress | None) -> None:
    """Train every (arm, seed) in its own process, one per core; each resumes from its own checkpoint.

    Ctrl-C, or a SIGTERM to this process or to any worker, stops them all after their next step,
    each with its checkpoint, and the run resumes later (`train.workers.run_jobs`).
    """
    try:
        run_jobs_reporting(_train_job, [(cfg, arm, seed, ckpt[arm, seed]) for arm, seed in jobs], workers, progress,
                           steps * len(jobs), {job: steps_done(ckpt[job]) for job in jobs})
    except TrainingInterrupted:
        raise TrainingInterrupted(-1, path) from None  # the jobs stop at steps of their own: no one step to name


def architecture(cfg: TransformerExperiment) -> dict[str, Any]:
    return {"kind": ARCH_KIND, **cfg.transformer.model_dump(mode="json"), "vocab": build_language(cfg).vocab_size,
            "context": cfg.language.context, "seeds": cfg.train.member_seeds(), "arms": arms(cfg)}


def finish(cfg: TransformerExperiment, path: Path, lang, results: dict[tuple[str, int], ArmResult], seeds: list[int],
           names: list[str]) -> dict[str, Any]:
    tc, ctx = cfg.transformer, cfg.language.context
    first = next(iter(results.values()))
    objective = build_sequence_objective(cfg, first.model)
    concept = cfg.evaluate.concept or (cfg.concepts[0].name if cfg.concepts else None)
    anchors = objective.anchors(concept) if concept else []
    # what every model is measured against: the anchor, or (control-only runs) a residual axis 0 for reference
    residual = [SequenceSite("embed"), *[SequenceSite(f"blocks.{i}") for i in range(tc.layers)]]
    extra = [s for s, _ in anchors if s not in residual]
    map_sites = residual + extra
    axis = torch.zeros(tc.width)
    axis[0] = 1.0
    anchor_of = {s: v for s, v in anchors}
    map_dirs = [anchor_of.get(s, axis) if s.head is None else anchor_of[s] for s in map_sites]
    weight, similarity = ev.concept_scores(lang)
    sets = ev.eval_lines(lang, tc.eval_lines, tc.reddest)

    # metrics.csv: step, seed, arm (1 = anchored), schedule values, losses
    header = ["step", "seed", "anchored", *first.metric_names]
    table = [np.column_stack([np.arange(len(r.metrics)), np.full(len(r.metrics), seed), np.full(len(r.metrics), arm == "anchored"), r.metrics])
             for (arm, seed), r in results.items()]
    runs.write_metrics_csv(path / runs.METRICS, header, np.concatenate(table), integer_columns=3)
    write_arms(path, {k: r.model for k, r in results.items()}, "anchoring-transformer-1")

    rows: list[dict[str, Any]] = []
    maps: dict[str, list[torch.Tensor]] = {a: [] for a in names}
    probes: dict[str, list] = {a: [] for a in names}
    curves: dict[str, list] = {}
    edits: dict[str, dict[str, list[dict]]] = {spec.name: {a: [] for a in names} for spec in cfg.interventions}
    probe_sites = residual[1:] + extra
    probe_dir = anchors[0][1] if anchors else None
    targets_of = {spec.name: edit_targets(cfg, objective, spec) for spec in cfg.interventions}
    for (arm, seed), r in results.items():
        model = r.model
        row: dict[str, Any] = {"seed": seed, "arm": arm}
        right = ev.score(model, lang, sets, ctx)
        acc = ev.accuracy_table(lang, sets, right, tc.reddest, tc.redish)
        row.update({k: v for k, v in acc.items() if not k.startswith(("n ", "right "))})
        seen = ev.probe(model, lang, ctx, map_sites)
        amap = ev.alignment_map(seen, map_sites, map_dirs)
        maps[arm].append(amap)
        for s, _ in anchors:
            i = map_sites.index(s)
            for slot in ("a", "= → x"):
                st = ev.alignment_stats(amap[i, ev.MAP_SLOTS.index(slot)], weight, similarity)
                for k, v in st.items():
                    row[f"{s} {slot} {k}"] = v
        probes[arm].append(ev.probe_concept(seen, lang, probe_sites, probe_dir, tc.reddest))
        curves.setdefault(f"{arm}", []).append(ev.accuracy_by_redness(lang, sets, right))
        for spec in cfg.interventions:
            targets = targets_of[spec.name]
            if arm != "anchored":  # the control has no anchor: the same edit along a post-hoc direction
                targets = [(s, ev.mean_difference(seen, lang, s, tc.reddest)) for s, _ in targets]
            with ev.edited(model, targets, spec.method):
                right_after = ev.score(model, lang, sets, ctx)
            after = ev.accuracy_table(lang, sets, right_after, tc.reddest, tc.redish)
            curves.setdefault(f"{arm}, {spec.name}", []).append(ev.accuracy_by_redness(lang, sets, right_after))
            edits[spec.name][arm].append(edit_record(seed, arm, acc, after))
        rows.append(row)

    runs.write_atomic(path / "alignment.safetensors", st_save(  # cos(h, anchor): (seeds, sites, slots, colours) per arm
        {arm: torch.stack(ms).contiguous() for arm, ms in maps.items()},
        metadata={"sites": json.dumps([str(s) for s in map_sites]), "slots": json.dumps(list(ev.MAP_SLOTS)),
                  "seeds": json.dumps(seeds)}))
    summary = summarize(cfg, rows, edits, anchors, names)
    summary["probes"] = {a: probes[a] for a in names}
    figures(cfg, path, lang, results, maps, map_sites, curves, anchors)
    write_report(cfg, path, summary)
    return summary


def edit_record(seed: int, arm: str, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """One model's edit in the summary: both accuracy tables and the two drops the targets judge,
    each from its own group's counts (red answers should fall, lines without any red-ish colour not)."""
    return {"seed": seed, "before": before, "after": after,
            "red_answer_drop": ev.accuracy_drop(before, after, "red answer"),
            "no_red_drop": ev.accuracy_drop(before, after, "no red"),
            "direction": "anchor" if arm == "anchored" else "difference of means"}


def summarize(cfg: TransformerExperiment, rows: list[dict], edits: dict, anchors, names: list[str]) -> dict[str, Any]:
    med = {a: {k: median([r[k] for r in rows if r["arm"] == a]) for k in rows[0] if k not in ("seed", "arm")
               and all(k in r for r in rows if r["arm"] == a)} for a in names}
    summary: dict[str, Any] = {"experiment": cfg.name, "upstream": cfg.upstream, "kind": "transformer",
                               "seeds": [], "anchored_seeds": None, "models": rows, "median": med}
    targets: dict[str, Any] = {}
    if "anchored" in names and "control" in names:
        gaps = [a["held-out"] - c["held-out"] for a in rows if a["arm"] == "anchored"
                for c in rows if c["arm"] == "control" and c["seed"] == a["seed"]]
        worst = max(gaps, key=abs) if gaps else float("nan")  # judged on every seed, so the line shows the worst one
        targets["held-out gap (anchored − control), worst seed"] = {"per_seed": gaps, "worst": worst,
                                                                    "median": median(gaps),
                                                                    "met": bool(gaps) and abs(worst) <= 0.02}
    for s, _ in anchors:
        key = f"{s} a"
        m = med["anchored"]
        targets[f"containment at {s} (operand position)"] = {"median": m[f"{key} containment"], "met": m[f"{key} containment"] <= 0.1}
        targets[f"margin at {s} (operand position)"] = {"median": m[f"{key} margin"], "met": m[f"{key} margin"] >= 0.3}
    summary["interventions"] = {}
    for name, per_arm in edits.items():
        block = {}
        for arm, items in per_arm.items():
            block[arm] = {"per_seed": items,
                          "red_answer_drop": median([e["red_answer_drop"] for e in items]),
                          "no_red_drop": median([e["no_red_drop"] for e in items])}
        summary["interventions"][name] = block
        if "anchored" in block:
            a = block["anchored"]
            targets[f"{name}: red-answer accuracy drop ≥ 0.5"] = {"median": a["red_answer_drop"], "met": a["red_answer_drop"] >= 0.5}
            targets[f"{name}: no-red accuracy drop ≤ 0.05"] = {"median": a["no_red_drop"], "met": a["no_red_drop"] <= 0.05}
    if cfg.transformer.judge:
        summary["targets"] = mark_infinite(targets)
    else:  # the same figures, no verdict: the targets were set for the residual stream
        summary["targets"], summary["figures"] = {}, mark_infinite({k: {kk: v for kk, v in t.items() if kk != "met"}
                                                                    for k, t in targets.items()})
    return summary


def median_maps(maps: dict[str, list[torch.Tensor]], w: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per arm, the median over seeds of each (site, slot)'s margin (concept-weighted mean cos − mean
    cos over colours) and containment (mean cos). `maps[arm]`: one `(sites, slots, colours)` per seed.
    np.median, the mean of the middle two for an even count, as every table and target line takes;
    torch's median takes the lower one, so a heatmap could show a target met that the table misses."""
    margin, mean = {}, {}
    for arm, ms in maps.items():
        stack = torch.stack(ms)  # (seeds, sites, slots, colours)
        margin[arm] = np.median(((stack * (w / w.sum())).sum(-1) - stack.mean(-1)).numpy(), axis=0)
        mean[arm] = np.median(stack.mean(-1).numpy(), axis=0)
    return margin, mean


def figures(cfg, path: Path, lang, results, maps, map_sites, curves, anchors) -> None:
    figdir = path / "figures"
    cols = list(ev.MAP_SLOTS)
    rows = [str(s) for s in map_sites]
    w, _ = ev.concept_scores(lang)
    margin_maps, mean_maps = median_maps(maps, w)
    save_fig(sf.alignment_maps(margin_maps, rows, cols, "margin: concept-weighted cos(h, anchor) − mean over colours (median over seeds)"),
             figdir / "alignment_margin.png")
    save_fig(sf.alignment_maps(mean_maps, rows, cols, "containment: mean cos(h, anchor) over all colours (median over seeds)"),
             figdir / "alignment_containment.png")
    if anchors:
        s = anchors[0][0]
        i = map_sites.index(s)
        first = maps.get("anchored", next(iter(maps.values())))[0]
        save_fig(sf.colour_alignment(first[i, 0].numpy(), lang.lattice.rgb().numpy(), redness(lang.lattice.rgb()).numpy(),
                                     f"{s}, operand position, first seed"), figdir / "colour_alignment.png")
    merged = {k: (v[0][0], np.nanmedian(np.stack([c[1] for c in v]), 0)) for k, v in curves.items()}
    save_fig(sf.accuracy_vs_redness(merged, "exact match vs redness, before and after each edit"), figdir / "accuracy_vs_redness.png")
    names = next(iter(results.values())).metric_names
    show = [n for n in names if n not in ("lr", "labelled_lines") and n not in {t.weight for t in cfg.terms}]
    arms_ = sorted({a for a, _ in results})
    stacked = {a: np.stack([r.metrics for (arm, _), r in results.items() if arm == a]) for a in arms_}
    idx = [names.index(n) for n in show]
    title = "training (mean over seeds, moving average; concept terms only where a batch had a labelled line)"
    save_fig(sf.training_curves({a: m[:, :, idx] for a, m in stacked.items()}, show, title),
             figdir / "training_curves.png")


def write_report(cfg: TransformerExperiment, path: Path, summary: dict[str, Any]) -> None:
    figs = path / "figures"
    keys = ["seed", "arm", *ev.SETS, "red answer", "red-ish", "no red"]
    model_rows = [[r.get(k, "") for k in keys] for r in summary["models"]]
    sections = [("Overview", f"<p>{html.html.escape(cfg.description)}</p>"),
                ("Exact match per model", html.table_html(keys, model_rows))]
    if summary["targets"]:
        sections.append(("Targets", html.table_html(["target", "median (or as named)", "met"],
                                                    [[k, target_text(target_median(v)), v["met"]] for k, v in summary["targets"].items()])))
    if summary.get("figures"):
        sections.append(("The targets' figures, without a verdict (transformer.judge = false)", html.table_html(
            ["figure", "median (or as named)"], [[k, target_text(target_median(v))] for k, v in summary["figures"].items()])))
    for name, block in summary["interventions"].items():
        body = html.table_html(["arm", "direction", "red-answer drop (median)", "no-red drop (median)"],
                               [[arm, b["per_seed"][0]["direction"], b["red_answer_drop"], b["no_red_drop"]] for arm, b in block.items()])
        sections.append((f"Intervention: {name}", body))
    probe_rows = [[arm, p["site"], p["auc"], p.get("auc_without_anchor", float("nan"))]
                  for arm, per_seed in summary["probes"].items() for p in per_seed[0]]
    sections += [
        ("Linear probes (first seed; AUC for 'among the reddest', cross-validated by colour)",
         html.table_html(["arm", "site", "AUC", "AUC without anchor direction"], probe_rows)),
        ("Alignment margin over layer × position", html.image_html(figs / "alignment_margin.png", "margin")),
        ("Containment over layer × position", html.image_html(figs / "alignment_containment.png", "containment")),
        *([("Alignment per colour", html.image_html(figs / "colour_alignment.png", "alignment per colour"))]
          if (figs / "colour_alignment.png").is_file() else []),
        ("Accuracy vs redness", html.image_html(figs / "accuracy_vs_redness.png", "accuracy vs redness")),
        ("Training", html.image_html(figs / "training_curves.png", "training curves")),
        ("Resolved config", f"<pre>{html.html.escape(cfg.to_toml())}</pre>"),
    ]
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))


class TransformerKind(Kind):
    name = "transformer"
    config = TransformerExperiment

    def validate(self, cfg: TransformerExperiment) -> None:
        validate(cfg)

    def architecture(self, cfg: TransformerExperiment) -> dict[str, Any]:
        return architecture(cfg)

    def execute(self, cfg: TransformerExperiment, path: Path, progress: Progress | None) -> dict[str, Any]:
        return run(cfg, path, progress=progress)

    def has_checkpoint(self, path: Path) -> bool:
        return (path / "arms").is_dir() or (path / "checkpoint.safetensors").is_file()

    def open(self, path: Path, cfg: TransformerExperiment, arch: dict[str, Any], summary: dict[str, Any] | None):
        from anchoring.kinds.transformer.model import open_run

        return open_run(path, cfg, arch, summary)

    def summary_lines(self, summary: dict[str, Any]) -> list[Any]:
        return summary_lines(summary)

    def intervene(self, run_, spec):
        from anchoring.kinds.transformer import control

        return control.intervene(run_, spec)

    def delete(self, run_, spec, out: Path):
        from anchoring.kinds.transformer import control

        return control.delete(run_, spec, out)

    def intervention_lines(self, path: Path) -> list[Any]:
        from anchoring.kinds.transformer import control

        return control.intervention_lines(path)


KIND = TransformerKind()


def summary_lines(summary: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    if "edit" in summary:  # an edited run
        from anchoring.kinds.transformer.control import _table

        return [_table(f"{summary['experiment']}: deleted {summary['edit']['concept']}", summary["edit_rows"])]
    keys = ["seed", "arm", "seen", "held-out", "complement", "lighten", "red answer", "no red"]
    table = Table(title=f"{summary['experiment']}: exact match per model")
    for k in keys:  # two-word headers on two lines: the table fits 80 columns, no header cut to "complem…"
        table.add_column(k.replace(" ", "\n"), justify="right")
    for r in summary["models"]:
        table.add_row(*[f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys])
    lines: list[Any] = [table]
    for name, block in summary.get("interventions", {}).items():
        for arm, b in block.items():
            lines.append(f"{name} [{arm}, {b['per_seed'][0]['direction']}]: accuracy drop on red answers "
                         f"{b['red_answer_drop']:+.3f}, on equations without red {b['no_red_drop']:+.3f} (median over seeds)")
    for name, t in summary.get("targets", {}).items():
        lines.append(f"{'met ' if t['met'] else 'MISS'}  {name}: {target_text(target_median(t))}")
    figures = summary.get("figures", {})
    if figures:  # transformer.judge = false: reported as they come
        lines.append("the residual-stream targets' figures, reported without a verdict for this experiment "
                     "(transformer.judge = false; docs/method.md):")
    for name, t in figures.items():
        lines.append(f"      {name}: {target_text(target_median(t))}")
    return lines
