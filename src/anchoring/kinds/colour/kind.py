"""The colour autoencoder kind (M1, M2): an ensemble of seeds trained in lockstep, evaluated
for hue structure and anchoring, edited (suppress, repel, ablate, prune) and reported."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.table import Table
from safetensors.torch import save as st_save

from anchoring import runs
from anchoring.config import InterventionConfig
from anchoring.domains.colour import NAMES, named_rgb, rgb_grid
from anchoring.errors import AnchoringError
from anchoring.evaluate.selection import edit_summary, pareto_selection
from anchoring.evaluate.stats import median
from anchoring.kinds.base import EditResult, Kind, Progress, Run, StepCallback
from anchoring.kinds.colour import control
from anchoring.kinds.colour.config import ColourExperiment
from anchoring.kinds.colour.deletion import deletion_landing, landing_rows
from anchoring.kinds.colour.deletion_figures import landing_cosines, landing_plane
from anchoring.kinds.colour.edits import evaluate_edit, named_error_table, stacked
from anchoring.kinds.colour.metrics import concept_exemplar
from anchoring.kinds.colour.model import ColourRun, architecture, open_run
from anchoring.kinds.colour.objective import build_objective, build_timeline, check_curriculum, training_points
from anchoring.kinds.colour.plan import make_plan
from anchoring.kinds.colour.sites import check_sites
from anchoring.kinds.colour.summary import summarize_seeds
from anchoring.kinds.colour.training import CHECKPOINT, TrainResult, metrics_table, train
from anchoring.report import animation, figures, html
from anchoring.resources import check_fits
from anchoring.train.checkpoint import concat_members, steps_done


class ColourKind(Kind):
    name = "colour"
    config = ColourExperiment
    studies = frozenset({"compare", "combinations", "sweep"})

    def validate(self, cfg: ColourExperiment) -> None:
        check_fits(memory_estimate(cfg), f"{cfg.name} with {members(cfg)} seed{'s' if members(cfg) > 1 else ''}",
                   "train fewer --seeds at once (or split them with `anchoring sweep`)" if members(cfg) > 1 else
                   "one model alone is too big: fewer --steps or a larger train.snapshot_every (a run keeps its metrics of "
                   "every step and a latent snapshot every snapshot_every steps), or a smaller model.hidden or model.latent_dim")
        if cfg.evaluate.select == "pareto" and cfg.train.seed_list is not None and len(set(cfg.train.seed_list)) != len(cfg.train.seed_list):
            raise AnchoringError("evaluate.select = 'pareto' picks seeds by name, so train.seed_list must not repeat a seed")
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
        check_sites(cfg, objective)  # a bad site otherwise fails in the first step, or after the last
        h, w = cfg.model.latent_dim, cfg.evaluate.hue_dims  # read after training, so refused now
        if len(set(w)) != 2 or any(not 0 <= d < h for d in w):
            raise AnchoringError(f"evaluate.hue_dims {list(w)} must be two different dims within 0..{h - 1}")
        names = [c.name for c in cfg.concepts]
        if names and cfg.evaluate.concept and cfg.evaluate.concept not in names:  # "" or None: no concept checked
            raise AnchoringError(f"evaluate.concept {cfg.evaluate.concept!r} is not a concept of this experiment "
                                 f"({', '.join(names)}); its anchoring columns would be left out without a word")

    def architecture(self, cfg: ColourExperiment) -> dict[str, Any]:
        return architecture(cfg)

    def execute(self, cfg: ColourExperiment, path: Path, progress: Progress | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        before = steps_done(path / CHECKPOINT)
        result = train(cfg, path, progress=progress)
        train_s = time.perf_counter() - t0
        summary = finish(result, path)
        # a merged sweep point, or a resume after the last step, trains nothing: its seconds are loading
        trained = steps_done(path / CHECKPOINT) > before
        summary["timing"] = {"train_s": round(train_s, 3)} if trained else {"train_s": None, "load_s": round(train_s, 3)}
        return summary

    def has_checkpoint(self, path: Path) -> bool:
        return (path / CHECKPOINT).is_file()

    def open(self, path: Path, cfg: ColourExperiment, arch: dict[str, Any], summary: dict[str, Any] | None) -> ColourRun:
        return open_run(path, cfg, arch, summary)

    def summary_lines(self, summary: dict[str, Any]) -> list[Any]:
        return summary_lines(summary)

    def intervene(self, run: Run, spec: InterventionConfig) -> EditResult:
        return control.intervene(run, spec)

    def delete(self, run: Run, spec: InterventionConfig, out: Path) -> EditResult:
        return control.delete(run, spec, out)

    def relearn(self, run: Run, **options: Any) -> EditResult:
        return control.relearn(run, **options)

    def intervention_lines(self, path: Path) -> list[Any]:
        return control.intervention_lines(path)

    def attack_lines(self, summary: dict[str, Any]) -> list[Any]:
        return [control.attack_table(summary)]

    sweep_figure = ("figures/latent_slices.png", "latent slices")

    def seed_blocks(self, cfg: ColourExperiment, n: int) -> list[list[int]]:
        if cfg.train.term_masks is not None:
            raise AnchoringError("sweeps set the seeds themselves; remove train.term_masks")
        # reactive controllers decide from metrics of the whole ensemble: such a run cannot be split by seed
        return super().seed_blocks(cfg, 1 if cfg.reactive else n)

    def shard_memory(self, cfg: ColourExperiment) -> int:
        return memory_estimate(cfg)  # the shard's seeds as one ensemble

    def train_shard(self, cfg: ColourExperiment, shard_dir: Path, callbacks: Sequence[StepCallback] = ()) -> None:
        train(cfg, shard_dir, callbacks=[lambda step, _result, cb=cb: cb(step) for cb in callbacks])

    def shard_files(self, cfg: ColourExperiment, shard_dir: Path) -> list[Path]:
        return [Path(CHECKPOINT)]

    def merge_shards(self, cfg: ColourExperiment, shard_dirs: list[Path], path: Path) -> None:
        concat_members([d / CHECKPOINT for d in shard_dirs], path / CHECKPOINT)  # the ensemble of all the seeds

    def sweep_row(self, summary: dict[str, Any]) -> dict[str, Any]:
        rows = summary["seeds"]
        row = {"seeds": len(rows), "anchored": summary.get("anchored_seeds")}
        if rows and "anchor_cos" in rows[0]:
            row["anchor_cos_median"] = median(r["anchor_cos"] for r in rows)
        if rows:
            row["val_mse_median"] = median(r["val_mse"] for r in rows)
        return row


KIND = ColourKind()


def members(cfg: ColourExperiment) -> int:
    return len(cfg.train.seed_list) if cfg.train.seed_list is not None else cfg.train.seeds


def memory_estimate(cfg: ColourExperiment) -> int:
    """Bytes an ensemble of `members` seeds holds while training, without building it: weights,
    gradients and two Adam moments per parameter; per-step metrics; latent snapshots; one
    batch's activations through every layer (forward and backward); doubled for temporaries."""
    m = cfg.model
    widths = [3, *m.hidden, m.latent_dim, *reversed(m.hidden), 3]
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    steps = cfg.train.steps or 10_000
    snaps = (steps // cfg.train.snapshot_every + 2) if cfg.train.snapshot_every else 2
    per_member = (4 * params + steps * (2 + len(cfg.terms)) + snaps * 512 * m.latent_dim
                  + 4 * cfg.data.batch_size * sum(widths) + cfg.data.batch_size ** 2)
    # evaluation after training: a module per seed (about 64 KiB of Python objects) and every seed's
    # outputs and latents on the validation grid, a few copies each; 0.37 MB per seed was measured at
    # 2000 seeds of `anchored`, where the training terms above give 0.15
    evaluation = 64 * 1024 + 16 * cfg.data.validation_levels ** 3 * (6 + m.latent_dim)
    return members(cfg) * (2 * 4 * per_member + evaluation)


def summary_lines(summary: dict[str, Any]) -> list[Any]:
    """The per-seed table, each edit's headline numbers and the anchoring count."""
    lines: list[Any] = []
    rows = summary.get("seeds", [])
    header, body = seed_table(rows)
    if rows:
        table = Table(title=f"{summary['experiment']}: per-seed results")
        for h in header:
            table.add_column(h, justify="right")
        for r in body:
            table.add_row(*[("yes" if v else "NO") if isinstance(v, bool) else (f"{v:.4g}" if isinstance(v, float) else str(v))
                            for v in r])
        lines.append(table)
    selected = summary.get("selection") if summary.get("select") == "pareto" else None
    for name, e in summary.get("interventions", {}).items():
        after = {r["colour"]: r["after"] for r in e["table"]}
        shown = ", ".join(f"{c} {after[c]:.3f}" for c in ("red", "cyan", "lime", "purple", "grey") if c in after)
        lines.append(f"{name}: median MSE after — {shown}; selectivity R² median {e['selectivity_median']:z.2f}")
        if selected:
            sel = {r["colour"]: r["selected"] for r in selected["edits"][name]}
            shown = ", ".join(f"{c} {sel[c]:.3f}" for c in ("red", "cyan", "lime", "purple", "grey") if c in sel)
            lines.append(f"{name} on the {len(selected['seeds'])} Pareto-selected seeds {selected['seeds']}: {shown}; "
                         f"selectivity R² median {sel['selectivity']:z.2f}")
    def num(v: Any, fmt: str, width: int = 0) -> str:  # a median of nothing is NaN, saved as null: a dash
        return f"{v:{width}{fmt}}" if isinstance(v, (int, float)) and math.isfinite(v) else "–".rjust(width)

    for r in summary.get("combinations", []):  # plain lines: 31 rows of long names
        lines.append(f"{r['formed']:>5} formed  hue order {num(r['hue_order'], '.2f')}  anchor "
                     f"{num(r['anchor_angle_deg'], '.1f', 6)}°  in plane {num(r['vibrant_in_plane'], '.2f')}  "
                     f"spread {num(r['spread_deg'], '.1f', 5)}°  {r['terms']}")
    if summary.get("always_on"):
        lines.append(f"on in every subset as well (not in combine): {', '.join(summary['always_on'])}")
    comparison = summary.get("comparison")
    if comparison:
        table = Table(title=f"{summary['experiment']}: comparison")
        for h in comparison[0]:
            table.add_column(h, justify="right")
        for r in comparison:
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
        lines.append(table)
    if "edit" in summary:  # a run written by `delete`
        from anchoring.kinds.colour.control import colour_table

        e = summary["edit"]
        lines += colour_table(f"{e['method']} of {e['concept'] or e['dims']}: per-colour MSE", summary["edit_table"],
                              summary["edit_selectivity"], e.get("k"))  # deletions written before k was recorded: unnamed
    n = summary.get("anchored_seeds")
    if n is not None:
        lines.append(f"{n}/{len(rows)} seeds anchored ({summary['criterion']})")
    return lines


def finish(result: TrainResult, path: Path) -> dict[str, Any]:
    """Metrics, snapshots, evaluation, figures and report for a trained ensemble."""
    cfg = result.config
    # a term is often named like its weight column (norm, planar, repel): two "norm" columns read back
    # as "norm" (the weight) and "norm.1" (the term); the schedule's copy is written "norm:weight"
    header = ["step", "seed", *[f"{n}:weight" if n in result.metric_names else n for n in result.timeline.names],
              *result.metric_names]
    runs.write_metrics_csv(path / runs.METRICS, header, metrics_table(result), integer_columns=2)
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
        "criterion": criterion(cfg),
    }
    if result.decisions:
        summary["reactive"] = [vars(d) for d in result.decisions]
    if edits:
        summary["interventions"] = edits
        if len({r["seed"] for r in rows}) == len(rows):  # seeds name members only when none repeats
            summary["pareto_seeds"] = pareto_seeds(rows, edits)
            summary["selection"] = selection_summary(rows, edits, summary["pareto_seeds"])
            summary["select"] = cfg.evaluate.select
    write_report(path, cfg, rows, summary)
    return summary


def evaluate_interventions(cfg: ColourExperiment, objective, models, rows: list[dict], figdir: Path) -> dict[str, Any]:
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
            "selectivity_median": median(res["selectivity"].tolist()),
            "named_after": {n: [float(x) for x in res["named_after"][:, j]] for j, n in enumerate(NAMES)},
            "table": table,
            "grid_mse": {k: [float(x) for x in res[k]] for k in ("hsv_grid_before", "hsv_grid_after", "rgb_grid_before", "rgb_grid_after")},
        }
        figures.save(figures.hue_error_curves(res["hue_after"], (0.25, 0.5, 0.75, 1.0), f"{spec.name}: error vs hue (s = 1)"),
                     figdir / f"{spec.name}_hue_error.png")
        with torch.no_grad():
            outputs = after(named_rgb())
        figures.save(figures.reconstruction_grid(named_rgb(), outputs, NAMES, seeds), figdir / f"{spec.name}_reconstruction.png")
        if spec.method in ("ablate", "prune") and concept is not None and concept.anchor is not None:
            # where the concept lands once its dims are gone: what decides whether the deletion is clean
            exemplar = concept_exemplar(concept.labeller, named_rgb())
            landing = deletion_landing(models, list(plan.dims), exemplar)
            out[spec.name]["landing"] = landing_rows(landing, seeds)
            figures.save(landing_cosines(landing, seeds), figdir / f"{spec.name}_landing.png")
            figures.save(landing_plane(landing, seeds), figdir / f"{spec.name}_landing_plane.png")
    return out


def selection_summary(rows: list[dict], edits: dict[str, Any], selected: list[int]) -> dict[str, Any]:
    """Every edit's per-colour medians over all seeds and over the Pareto-selected seeds, side by side:
    a reader comparing with a paper that picked its runs from such a front needs both."""
    seeds = [r["seed"] for r in rows]
    return {"seeds": selected, "edits": {name: edit_summary(e["named_after"], seeds, selected, e["selectivity"])
                                         for name, e in edits.items()}}


def pareto_seeds(rows: list[dict], edits: dict[str, Any]) -> list[int]:
    """Seeds on the Pareto front of (val reconstruction, val anchoring loss, selectivity of the first edit)."""
    return pareto_selection(rows, next(iter(edits.values()))["selectivity"])


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
        if "landing" in e:
            land = [[r["seed"], r["error"], r["residual_norm"], ", ".join(f"{n} {c:.2f}" for n, c in r["nearest"]),
                     r["decoded_as"], r.get("cos_grey_centre", float("nan"))] for r in e["landing"]]
            body += ("<p>Where the concept lands after the deletion: its latent with the deleted dims zeroed and "
                     "renormalised, compared with the named colours' unedited latents. The deletion is clean when it "
                     "lands where the decoder reads a neutral colour (near the greys' centre), not next to the concept.</p>"
                     + html.table_html(["seed", "error after", "share outside the deleted dims", "nearest named colours (cos)",
                                        "decodes as", "cos to greys' centre"], land)
                     + html.image_html(figs / f"{name}_landing.png", "cosines after deletion")
                     + html.image_html(figs / f"{name}_landing_plane.png", "landing among the named colours"))
        sections.append((f"Intervention: {name}", body))
    selection = summary.get("selection")
    if selection:
        body = (f"<p>Seeds on the Pareto front of (validation reconstruction ↓, validation anchoring loss ↓, selectivity ↑ "
                f"of the first edit): {selection['seeds']}. Medians over all seeds and over the selected ones:</p>")
        for name, rows in selection["edits"].items():
            body += f"<h3>{html.html.escape(name)}</h3>" + html.table_html(
                ["colour", f"all ({rows[0]['n_all']})", f"selected ({rows[0]['n_selected']})"],
                [[r["colour"], r["all"], r["selected"]] for r in rows])
        sections.append(("Pareto selection", body))
    return sections


def write_report(path: Path, cfg: ColourExperiment, rows: list[dict], summary: dict[str, Any]) -> None:
    header, body = seed_table(rows)
    masks = cfg.train.term_masks
    if masks is not None and len(masks) == len(body):  # a term-subset ensemble: seeds repeat, so say which member is which
        names = [t.name or t.kind for t in cfg.terms]
        header = ["terms on", *header]
        body = [["+".join(n for n, on in zip(names, m) if on) or "none", *b] for m, b in zip(masks, body)]
    figs = path / "figures"
    verdict = (f"<p><b>{summary['anchored_seeds']} of {len(rows)} seeds anchored</b> ({summary['criterion']}).</p>"
               if summary.get("anchored_seeds") is not None else "")
    sections = [
        ("Overview", f"<p>{html.html.escape(cfg.description)}</p><p>upstream experiment: {cfg.upstream or '–'}; steps: {summary['steps']}; "
                     f"seeds: {', '.join(map(str, cfg.train.member_seeds()))}</p>{verdict}"),
        ("Per-seed results", html.table_html(header, body)),
        ("Latent space (axis-aligned slices" + ("; × marks the anchor)" if any(c.anchor for c in cfg.concepts) else ")"),
         html.image_html(figs / "latent_slices.png", "latent slices")),
        ("Loss curves", html.image_html(figs / "loss_curves.png", "loss curves")),
        ("Schedule", html.image_html(figs / "schedule.png", "schedule")),
        *([("Phase history (seed %d)" % cfg.train.member_seeds()[0], html.image_html(figs / "phase_history.png", "phase history")),
           ("Latent evolution", html.image_html(figs / "evolution.gif", "latent evolution", mime="image/gif"))]
          if (figs / "evolution.gif").is_file() else []),
        *intervention_sections(summary, figs),
        ("Resolved config", f"<pre>{html.html.escape(cfg.to_toml())}</pre>"),
    ]
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))


def criterion(cfg) -> str:
    """What made a seed count as anchored, in words; "" or None as evaluate.concept checks no concept."""
    parts = [f"12 hues in order around dims {tuple(cfg.evaluate.hue_dims)}"] if cfg.evaluate.hue_order else []
    if cfg.evaluate.concept:
        parts.append(f"cos({cfg.evaluate.concept}, anchor) ≥ {cfg.evaluate.min_cosine}")
    return " and ".join(parts) or "none (no concept checked, no hue order)"
