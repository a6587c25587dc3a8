"""`anchoring intervene` and `anchoring delete` on an LM run.

Both act with the run's own anchor (the concept's axis, or every dim of its subspace) on every
arm, and report what the edit costs in the unlearning currency: validation nats/char on forget
passages (whole, and at concept positions) and on retain passages, before → after. On the control
and the filtered arms the anchor is just an arbitrary direction, which is the point of showing
them: only the anchored arm should lose its concept.
`intervene` also scores the anchored arm under the hook's matched control (`control.matched_random`):
the same states turned by the same angles, towards random directions. `delete` likewise scores the
anchored arm with as many other directions deleted (`edits.matched_directions`): what removing that
many directions the concept was not put on costs the same model.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.table import Table

from anchoring import runs
from anchoring.config import InterventionConfig
from anchoring.control.falloff import parse_falloff
from anchoring.control.relearn import diverging
from anchoring.control.surgery import residual_component
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import mark_infinite, target_median, target_text
from anchoring.kinds.arms import write_arms
from anchoring.kinds.base import EditResult, intervention_rows
from anchoring.kinds.lm import evaluate as ev
from anchoring.kinds.lm import unlearning as ul
from anchoring.kinds.lm import unlearning_table as ut
from anchoring.kinds.lm.checks import check_relearnable, check_scored
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import CORPUS
from anchoring.kinds.lm.direction import anchored_sites
from anchoring.kinds.lm.edits import concept_directions, edited, first_site, matched_directions
from anchoring.kinds.lm.kind import unlearning
from anchoring.kinds.lm.report import left_out_note
from anchoring.kinds.lm.unlearning import REPAIR_ONLY, losses, repair, repair_windows
from anchoring.report import html

KEYS = ("forget", "concept", "retain")


def _eval_set(run) -> ev.EvalSet:
    cfg = run.config
    return ev.eval_set(run.data, cfg.lm.tokens, cfg.evaluate.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)


def _rows(run, after_of, controls: dict[str, Any] | None = None, tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Before → after of every (arm, seed); `controls` {label: after_of} adds rows for other edits of
    the anchored arm (labelled "anchored · label"), scored against the same "before". `tick()` after
    every model scored."""
    es = _eval_set(run)
    rows = []
    tick = tick or (lambda: None)
    for arm, models in run.arms.items():
        for i, (seed, model) in enumerate(zip(run.seeds, models)):
            b = losses(model, es, run.config.evaluate.batch_size)
            tick()
            edits = {arm: after_of}
            if arm == "anchored":
                edits.update({f"anchored · {label}": f for label, f in (controls or {}).items()})
            for name, f in edits.items():
                a = losses(f(arm, i, model), es, run.config.evaluate.batch_size)
                tick()
                rows.append({"arm": name, "seed": seed, **{f"{k} before": b[k] for k in KEYS}, **{f"{k} after": a[k] for k in KEYS}})
    return rows


def _table(title: str, rows: list[dict[str, Any]]) -> Any:
    """The edit's before → after table, or (terminal too narrow for it) the same cells one line per model."""
    from anchoring.kinds.lm.unlearning_table import TableOrList

    table = Table(title=title)
    heads = ("arm", "seed", *[f"{k}: before → after" for k in KEYS], "Δconcept − Δretain")
    longest = max((len(str(r["arm"])) for r in rows), default=3)
    for h in heads:
        table.add_column(h, justify="right", **({"min_width": longest} if h == "arm" else {}))  # not "weak-filte…"
    listed = [title + " (one line per model: the terminal is too narrow for the table):"]
    for r in rows:
        cells = [r["arm"], str(r["seed"]), *[f"{r[f'{k} before']:.3f} → {r[f'{k} after']:.3f}" for k in KEYS], f"{_gap(r):+.3f}"]
        table.add_row(*cells)
        listed.append(f"{cells[0]}, seed {cells[1]}: " + ", ".join(f"{k} {v}" for k, v in zip(KEYS, cells[2:]))
                      + f", Δconcept − Δretain {cells[-1]}")
    return TableOrList(table, listed)


def _gap(row: dict[str, Any]) -> float:
    """Δconcept − Δretain: what an edit costs concept text beyond what it costs the rest."""
    return (row["concept after"] - row["concept before"]) - (row["retain after"] - row["retain before"])


def _same_concept(spec: InterventionConfig, cfg: LMExperiment) -> None:
    """An LM run edits its own concept's anchor: another concept or a list of dims would be ignored."""
    if spec.dims is not None:
        raise AnchoringError(f"--dims is for the colour models; an 'lm' run edits its concept's anchor (--concept {cfg.text.concept})")
    _own_concept(spec.concept, cfg)


def _own_concept(concept: str | None, cfg: LMExperiment) -> None:
    if concept is not None and concept != cfg.text.concept:
        raise AnchoringError(f"--concept {concept!r}: this run anchors {cfg.text.concept!r}")


def intervene(run, spec: InterventionConfig) -> EditResult:
    """Suppress the concept's half-space at the anchored sites (hooks; the weights stay as they are)."""
    if spec.method != "suppress":
        raise AnchoringError(f"an 'lm' run supports --method suppress (weight deletion: `anchoring delete`), not {spec.method!r}")
    if not runs.SAFE_NAME.match(spec.name):
        raise AnchoringError(f"--name {spec.name!r}: use letters, digits and _.,+=- only (it names a folder inside the run)")
    cfg = run.config
    _same_concept(spec, cfg)
    concept_directions(cfg)  # a run that anchors nothing has no direction to suppress: say so before anything else
    sites = spec.sites or anchored_sites(cfg)
    if spec.site != "latent":
        sites = [spec.site]
    valid = ["embed", *[f"blocks.{i}" for i in range(cfg.lm.layers)]]
    for s in sites:
        if s not in valid:
            raise AnchoringError(f"site {s!r} is not a residual site of this model ({', '.join(valid)})")
    if not sites:
        raise AnchoringError(f"this run's concept {cfg.text.concept!r} has an anchor but no anchored site; name a "
                             f"residual site with --site")
    shape = parse_falloff(spec.falloff)
    out = run.path / "interventions" / spec.name
    runs.check_writable(out)
    earlier = (out / "summary.json").is_file()
    rows = _rows(run, lambda arm, i, m: edited(m, cfg, "suppress", sites=sites, shape=shape),
                 {"matched random move": lambda arm, i, m: edited(m, cfg, "suppress", sites=sites, shape=shape,
                                                                  random_control=run.seeds[i])})
    # the spec as run: "latent" is only the colour kinds' default site, never where this hook sat
    ran = spec.model_dump() | {"site": sites[0] if len(sites) == 1 else None, "sites": sites}
    runs.write_json(out / "summary.json", {"spec": ran, "sites": sites, "rows": rows})
    note = ("anchored · matched random move: the states the hook edits, turned by the same angles towards random "
            "directions (the hook's control)") if "anchored" in run.arms else None
    return EditResult(spec.name, [_table(f"{spec.name} at {', '.join(sites)}: validation nats/char", rows),
                                  *([note] if note else []),
                                  f"wrote {out}" + (f" (replacing an earlier intervention named {spec.name!r})" if earlier else "")],
                      [out], {"rows": rows})


def check_delete(cfg: LMExperiment, spec: InterventionConfig, repair_steps: int = 0, repair_lr: float | None = None) -> float:
    """Everything about a deletion that the config alone decides, so a bad option is refused before the
    run's models load; the repair's learning rate."""
    if spec.method not in ("ablate", "blind"):
        raise AnchoringError(f"delete on an 'lm' run removes the anchor direction from the writers (--method ablate) "
                             f"or the readers (--method blind), not {spec.method!r}")
    _same_concept(spec, cfg)
    if spec.site != "latent" or spec.sites:
        raise AnchoringError("delete on an 'lm' run edits every residual writer (or reader after the anchored site); it takes no --site")
    if repair_steps < 0:
        raise AnchoringError(f"--repair-steps must be ≥ 0, got {repair_steps}")
    if repair_lr is not None and not repair_steps:
        raise AnchoringError("--repair-lr needs --repair-steps")
    lr = cfg.unlearning.repair_lr if repair_lr is None else repair_lr
    if repair_steps and not (math.isfinite(lr) and lr > 0):
        raise AnchoringError(f"--repair-lr must be a positive number, got {lr}")
    return lr


def delete(run, spec: InterventionConfig, out: Path, repair_steps: int = 0, repair_lr: float | None = None,
           progress: Callable[[int, int], None] | None = None) -> EditResult:
    """Write a run whose models have the anchor direction(s) projected out of the embeddings and of
    every residual-writing matrix (`--method ablate`), or out of every matrix that reads the stream
    after the anchored site (`--method blind`; see docs/method.md); `load_run` opens it like any LM run.
    With `repair_steps`, every edited model (and the matched control) is then fine-tuned on retain
    passages with the edit put back after each step, as the unlearning table's repair does
    (`unlearning.repair`, same windows, rate `unlearning.repair_lr` unless given), and the anchored arm
    repaired with no edit is scored as that repair's own control."""
    cfg = run.config
    lr = check_delete(cfg, spec, repair_steps, repair_lr)
    kind = "blind" if spec.method == "blind" else "delete"
    out = runs.new_run_dir(cfg.name, out, resumable=False)
    runs.check_stageable(out)  # staged below: checked before any work
    directions = concept_directions(cfg)
    plural = "s" if len(directions) != 1 else ""
    others = [matched_directions(directions, torch.Generator().manual_seed(seed)) for seed in run.seeds]
    n_models = sum(len(ms) for ms in run.arms.values()) + 2 * len(run.arms.get("anchored", []))
    n_controls = 2 if repair_steps else 1  # the matched random edit, and the repair alone
    n_scored = 2 * sum(len(ms) for ms in run.arms.values()) + n_controls * len(run.arms.get("anchored", []))
    total = n_models * repair_steps + n_scored  # repair steps, then every model scored before and after
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    windows_of: dict[int, Any] = {}  # per seed: every model of a seed repairs on the same windows

    def concept_edit(m: torch.nn.Module) -> torch.nn.Module:
        return edited(m, cfg, kind, directions=directions)

    def fixed(model: torch.nn.Module, i: int, edit: Callable[[torch.nn.Module], torch.nn.Module] | None) -> torch.nn.Module:
        """`model` (of seed `run.seeds[i]`) edited, then repaired on retain text when asked, the edit
        kept in place; `edit` None: the repair alone."""
        after = model if edit is None else edit(model)
        if not repair_steps:
            return after
        if i not in windows_of:
            windows_of[i] = repair_windows(run.data, cfg.lm.tokens, run.seeds[i])
        windows = windows_of[i]
        with diverging(f"the repair of seed {run.seeds[i]}'s model", "give a smaller --repair-lr"):
            return repair(after, edit, lambda step: windows.batch(step, cfg.unlearning.relearn_batch), repair_steps, lr, tick)

    new = {arm: [fixed(m, i, concept_edit) for i, m in enumerate(ms)] for arm, ms in run.arms.items()}
    after_site = first_site(next(iter(new.values()))[0], anchored_sites(cfg)) if kind == "blind" else None
    what = ("out of the embeddings and of every residual-writing matrix of every arm" if kind == "delete" else
            f"out of every matrix of every arm that reads the residual stream after {after_site} (the stream still carries it)")
    probe = run.tokenize(run.data.texts[int(run.data.parts["validation"][0])])[None, : cfg.lm.context]
    sites = ["embed", *[f"blocks.{i}" for i in range(cfg.lm.layers)]]
    leftover = max(residual_component(m, v, probe, sites) for ms in new.values() for m in ms for v in directions)
    control = "matched random deletion" if kind == "delete" else "matched random blinding"
    controls = {control: lambda arm, i, m: fixed(m, i, lambda x: edited(x, cfg, kind, directions=others[i]))}
    if repair_steps:
        controls[REPAIR_ONLY] = lambda arm, i, m: fixed(m, i, None)
    rows = _rows(run, lambda arm, i, m: new[arm][i], controls, tick)
    edit = {"source": str(run.path.resolve()), "method": "delete-direction" if kind == "delete" else "blind-readers",
            "concept": cfg.text.concept, "directions": len(directions), "max_residual_component": leftover,
            **({"readers_after": after_site} if after_site else {}),
            **({"repair_steps": repair_steps, "repair_lr": lr} if repair_steps else {})}
    summary = {"experiment": cfg.name, "kind": "lm", "edit": edit, "edit_rows": rows}
    fixed_note = (f"every edited model was repaired: {repair_steps} fine-tuning steps at {lr:g} on retain passages, with the "
                  "edit put back after each step; 'before' is the model as trained"
                  + (f", and anchored · {REPAIR_ONLY} is the anchored model given the same repair with no edit"
                     if "anchored" in run.arms else "")) if repair_steps else ""
    with runs.staged(out) as tmp:  # all of it or nothing under `out`
        note = (f"# The weights of this run are those of {run.path.resolve()} after `anchoring delete` ({edit['method']}, concept "
                f"{cfg.text.concept}; edit.json lists every edit since training).\n# Training this config again gives the "
                f"models before any of those edits.\n")
        for name in (runs.CONFIG, runs.ARCH, "tokenizer.json"):
            text = (run.path / name).read_text()
            if name == runs.CONFIG:  # an edit of an edited run: the new note replaces the old one
                kept = text.splitlines(keepends=True)
                while kept and kept[0].startswith(("# The weights of this run are those of ",
                                                   "# Training this config again gives the models")):
                    kept.pop(0)
                text = note + "".join(kept)
            runs.write_atomic(tmp / name, text)
        if (run.path / CORPUS).is_file():  # the source's corpus fingerprint: the edited run rests on the same text
            runs.write_atomic(tmp / CORPUS, (run.path / CORPUS).read_text())
        write_arms(tmp, {(arm, seed): m for arm, ms in new.items() for seed, m in zip(run.seeds, ms)}, "anchoring-lm-1")
        previous = runs.read_json(run.path / "edit.json").get("lineage", []) if (run.path / "edit.json").is_file() else []
        runs.write_json(tmp / "edit.json", {**edit, "lineage": [*previous, edit]})
        head = ["arm", "seed", *[f"{k} {w}" for k in KEYS for w in ("before", "after")]]
        gap = "Δconcept − Δretain"
        key = ("<p>forget: whole validation passages with a reference label; concept: the tokens of their concept words "
               f"and the {cfg.evaluate.after} characters after them; retain: passages without a reference label. "
               f"{gap}: how much more the edit costs concept text than the rest (the edit's selectivity, in nats/char)."
               + (f" anchored · {html.html.escape(control)}: the same model with {len(directions)} random direction{plural} "
                  "edited the same way, the edit's control (not written to this run)." if "anchored" in run.arms else "") + "</p>")
        runs.write_atomic(tmp / runs.REPORT, html.page(f"anchoring: {cfg.name} (deleted {cfg.text.concept})", [
            ("Edit", f"<p>The anchor of {html.html.escape(cfg.text.concept)} ({len(directions)} direction{plural}) was projected "
                     f"{html.html.escape(what)}; the largest |h·v| left in any residual state of a validation passage is "
                     f"{leftover:.2e}.{' ' + html.html.escape(fixed_note) if fixed_note else ''}</p>"),
            ("Validation nats/char", key + html.table_html(
                [*head, gap], [[*[r[k] for k in head], _gap(r)] for r in rows]))]))
        runs.write_json(tmp / runs.SUMMARY, summary)
    note = (f"anchored · {control}: {len(directions)} other direction{plural} of the same model edited the same way "
            "(the edit's control; not written to the edited run)") if "anchored" in run.arms else None
    return EditResult(kind, [_table(f"{kind} {cfg.text.concept}: validation nats/char", rows), *([note] if note else []),
                             *([fixed_note] if fixed_note else []),
                             f"largest |h·v| left in the residual stream: {leftover:.2e}"
                             + (" (blinding leaves the stream as it is)" if kind == "blind" else ""), f"edited run: {out}"],
                      [out], summary)


def relearn(run, concept: str | None = None, samples: list[int] | None = None, steps: int | None = None,
            lr: float | None = None, progress: Callable[[int, int], None] | None = None, *, eval_chars: int | None = None,
            repair_steps: int | None = None, repair_lr: float | None = None, distil_steps: int | None = None,
            distil_noise: float | None = None, distil_lr: float | None = None, attack_unedited: bool | None = None,
            retain: int | None = None,
            threshold: float | None = None, baseline: bool | None = None) -> EditResult:
    """The unlearning evaluation of a finished run, without training it again: every method that its
    arms allow (anchoring's edits of the anchored arm, the post-hoc directions of the control, the
    filtered arms), scored on forget and retain text and attacked by relearning, exactly as
    `unlearning.enabled` does after training. `samples`, `steps`, `lr`, `eval_chars`, `repair_steps`,
    `repair_lr`, the `distil_*` options and `attack_unedited` replace the run's `unlearning.relearn_k`,
    `relearn_steps`, `relearn_lr`, `eval_chars`, `repair_steps`, `repair_lr`, `distil_*` and `attack_unedited`
    (a repair that diverged in training's evaluation is scored again at another rate this way). Written to
    `<run>/relearn/<concept>`."""
    colour_only = {"--retain": retain, "--threshold": threshold, "--baseline/--no-baseline": baseline}
    given = [flag for flag, v in colour_only.items() if v is not None]
    if given:
        raise AnchoringError(f"{given[0]} is for colour runs; an 'lm' run is attacked with --samples, --steps and --lr "
                             f"(its relearned loss is measured against the control arm's)")
    if steps is not None and steps < 1:  # the config allows 0 (no attack after training); the command is the attack
        raise AnchoringError(f"--steps must be a positive integer, got {steps}")
    cfg = run.config
    made = runs.edit_record(run.path)
    if made is not None:  # every arm, the control included, is already edited: no line to measure against
        source = made.get("source", "the run it was made from")
        raise AnchoringError(f"{str(run.path)!r} was written by `anchoring delete` (its control arm is edited too); "
                             f"relearn the run it was made from, {source}")
    _own_concept(concept, cfg)
    if "control" not in run.arms:
        raise AnchoringError(f"relearning is measured against the control arm, and this run has only "
                             f"{', '.join(run.arms)}; train it with the control (lm.arms)")
    u = cfg.unlearning
    options = {"relearn_k": samples, "relearn_steps": steps, "relearn_lr": lr, "eval_chars": eval_chars,
               "repair_steps": repair_steps, "repair_lr": repair_lr, "distil_steps": distil_steps,
               "distil_noise": distil_noise, "distil_lr": distil_lr, "attack_unedited": attack_unedited}
    update: dict[str, Any] = {"enabled": True, **{k: v for k, v in options.items() if v is not None}}
    try:  # the config's own checks, so the bounds and messages are the config keys'
        u = type(u).model_validate({**u.model_dump(), **update})
    except ValidationError as e:
        first = e.errors()[0]
        flags = {"relearn_k": "--samples", "relearn_steps": "--steps", "relearn_lr": "--lr", "eval_chars": "--eval-chars",
                 "repair_steps": "--repair-steps", "repair_lr": "--repair-lr", "distil_steps": "--distil-steps",
                 "distil_noise": "--distil-noise", "distil_lr": "--distil-lr", "attack_unedited": "--attack-unedited"}
        flag = flags.get(str(first["loc"][0]) if first["loc"] else "", "")
        raise AnchoringError(f"{flag or 'unlearning'}: {first['msg'].removeprefix('Value error, ')}") from None
    if u.distil_steps and "anchored" not in run.arms:
        raise AnchoringError(f"--distil-steps distils anchoring's deletion, and this run has only {', '.join(run.arms)}")
    cfg = cfg.model_copy(update={"unlearning": u})
    d = run.data
    if samples is not None:
        check_relearnable(cfg, d, "--samples")
    else:  # the run's own K, which a finished run cannot change
        check_relearnable(cfg, d, "the run's unlearning.relearn_k", fix="pass --samples with every")
    check_scored(cfg, d, "--eval-chars", u.eval_chars, fix="raise --eval-chars" + (
        "" if cfg.evaluate.order == "shuffled" else " (or train the run with evaluate.order = \"shuffled\")"))
    if "anchored" in run.arms:
        concept_directions(cfg)
    out = run.path / "relearn" / cfg.text.concept
    runs.check_stageable(out)  # staged below: checked before any work
    earlier = (out / runs.SUMMARY).is_file()
    models = {(arm, seed): m for arm, ms in run.arms.items() for seed, m in zip(run.seeds, ms)}
    made = not out.parent.exists()
    partial = out.parent / f".{out.name}-{ul.PARTIAL}"  # outside the staged folder: kept when the attack is stopped
    try:
        with runs.staged(out, replace=True) as tmp:  # all of it or nothing: a stopped attack leaves the earlier one
            res = unlearning(cfg, tmp, d, models, progress, partial=partial)
            targets = mark_infinite(ut.targets(res))
            summary = {"experiment": cfg.name, "source": str(run.path.resolve()), "concept": cfg.text.concept,
                       "unlearning_config": u.model_dump(), "unlearning": res, "targets": targets}
            runs.write_json(tmp / runs.SUMMARY, summary)
    except BaseException:
        if made and out.parent.is_dir() and not any(out.parent.iterdir()):  # nor an empty relearn/ of a first attack
            out.parent.rmdir()
        raise
    shutil.rmtree(partial, ignore_errors=True)
    lines = attack_lines(summary)
    lines.append(f"wrote {out}" + (" (replacing an earlier attack)" if earlier else ""))
    return EditResult("relearn", lines, [out], summary)


def intervention_lines(path: Path) -> list[Any]:
    """The table `intervene` printed, from the summary.json it wrote in `path`."""
    found = intervention_rows(path, "forget before")
    if found is None:
        return []
    name, rows, summary = found
    return [_table(f"{name} at {', '.join(summary.get('sites') or [])}: validation nats/char", rows)]


def attack_lines(summary: dict[str, Any]) -> list[Any]:
    """The unlearning table and its targets from an attack's summary: what `anchoring relearn`
    printed, and what `anchoring show RUN/relearn/<concept>` prints again from summary.json."""
    lines: list[Any] = [*ut.lines(summary["unlearning"])]
    lines += [f"{'met ' if t['met'] else 'MISS'}  {name}: {target_text(target_median(t))}{left_out_note(t)}"
              for name, t in summary["targets"].items()]
    return lines
