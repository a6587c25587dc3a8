"""`intervene`, `delete` and `relearn`: edit a finished run's models through its kind, and attack the edit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from anchoring import lifecycle, runs
from anchoring.cli.common import app, fail, kinds_with, open_run, print_lines, progress_bar, refuse_unfinished, stopped
from anchoring.errors import AnchoringError
from anchoring.kinds import kind_of
from anchoring.train import TrainingInterrupted
from anchoring.train.workers import sigterm_interrupts


def _dims(text: str | None, flag: str = "--dims", example: str = "0,1", distinct: bool = False) -> list[int] | None:
    """Comma-separated integers given to `flag` (named in the error: --dims, or relearn's --samples);
    `distinct`: refuse a value given twice here (--dims repeats are refused with the edit's own line)."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: expected comma-separated integers, e.g. {example}")
    repeated = sorted({v for v in values if values.count(v) > 1}) if distinct else []
    if repeated:  # relearn printed the same K row twice
        fail(f"{flag} {text!r} names {', '.join(map(str, repeated))} twice")
    return values


def _edit_spec(name: str, method: str, concept: str | None, dims: str | None, falloff: str, k: float, site: str):
    from pydantic import ValidationError

    from anchoring.config import InterventionConfig

    if concept is None and dims is None:
        fail("give --concept NAME or --dims 0,1 (the run has no single concept to act on by default)")
    try:
        return InterventionConfig(name=name, method=method, concept=concept, dims=_dims(dims), falloff=falloff, k=k, site=site)
    except ValidationError as e:
        first = e.errors()[0]
        fail(f"--{first['loc'][0]}: {first['msg']}")


def _only_concept(cfg) -> str | None:
    """The run's concept when it has exactly one (an LM run always does), so --concept may be left out."""
    names = kind_of(cfg).concepts(cfg)
    return names[0] if len(names) == 1 else None


def _apply_edit(action, what: str = "the edit", renamed: tuple[str, str] | None = None) -> None:
    """Run an edit, turning user errors into one line; print what the kind reports. Ctrl-C or a
    SIGTERM stops it as it stops `run`: one line and exit code 130. A run the edit was training
    (relearn's post-hoc baseline) keeps its checkpoint and is finished by `anchoring resume`; the
    edit, run again, then reuses it instead of training it anew. `renamed`: (old, new) lead of an
    error's line, for a command whose edit is not the named intervention the shared checks call it."""
    try:
        with sigterm_interrupts():
            res = action()
    except TrainingInterrupted as e:
        if e.run_dir is None:
            stopped("interrupted; run the command again")
        where = f"after step {e.step}; checkpoint saved" if e.step >= 0 else "while evaluating it; its training is saved"
        stopped(f"interrupted training {e.run_dir} {where} — finish it with `anchoring resume {e.run_dir}`, "
                f"then run this command again")
    except KeyboardInterrupt:
        stopped(f"interrupted before {what} was complete; run the command again")
    except AnchoringError as e:
        fail(str(e).replace(*renamed, 1) if renamed else str(e))
    print_lines(res.lines)


@app.command("intervene")
def intervene_cmd(
    run_dir: Path = typer.Argument(..., help="finished run directory"),
    concept: Optional[str] = typer.Option(None, "--concept", help="concept whose anchor direction to act on "
                                                             "(default: the run's only concept, if it has one)"),
    method: str = typer.Option("suppress", "--method", help="suppress (every kind; the only one for LM runs) | repel, zero (colour) | ablate "
                                                          "(colour, transformer)"),
    falloff: str = typer.Option("constant", "--falloff", help="constant[:s] | linear:a,b | power:a,p,b | bezier:x1,y1,x2,y2,end"),
    dims: Optional[str] = typer.Option(None, "--dims", help="dims for --method zero or ablate, e.g. 0,1 (with --concept: "
                                                           "these dims, scored against that concept)"),
    k: float = typer.Option(2.0, "--k", help="selectivity exponent: R² of error vs similarity^k"),
    site: str = typer.Option("latent", "--site", show_default=False,
                             help="module path to intervene at (default: a colour model's latent, a transformer's or "
                                  "LM's anchored sites)"),
    name: Optional[str] = typer.Option(None, "--name", help="output folder name under RUN/interventions/"),
) -> None:
    """Apply an inference-time intervention to every model of a run; print and save what it breaks."""
    if method not in ("suppress", "repel", "zero", "ablate"):
        fail(f"--method must be suppress, repel, zero (colour) or ablate (colour, transformer), not {method!r}")
    run = None
    if concept is None and dims is None:  # the run's only concept: its other options are checked before it loads
        _edit_spec("check", method, "?", None, falloff, k, site)
        run = open_run(run_dir, finished=True)
        concept = _only_concept(run.config)
    # the concept and the dims both, when both are given: the same concept with other dims is another edit
    what = "-".join(x for x in (concept, "dims" + dims.replace(",", "") if dims else None) if x) or "dims"
    label = name if name is not None else f"{method}-{what}-{falloff.replace(':', '-').replace(',', '_')}"
    if name is None and site != "latent" and runs.SAFE_NAME.match(f"{label}-at-{site}"):  # another site, another
        label += f"-at-{site}"  # folder (an odd site is left to the kind's own check of --site)
    spec = _edit_spec(label, method, concept, dims, falloff, k, site)
    run = run or open_run(run_dir, finished=True)
    _apply_edit(lambda: kind_of(run.config).intervene(run, spec))


@app.command("delete")
def delete_cmd(
    run_dir: Path = typer.Argument(..., help="finished run directory"),
    out_dir: Path = typer.Option(..., "--out", help="where to write the edited run"),
    concept: Optional[str] = typer.Option(None, "--concept", help="delete this concept's anchored dims "
                                                             "(default: the run's only concept, if it has one)"),
    dims: Optional[str] = typer.Option(None, "--dims", help="or these dims, e.g. 0,1 (with --concept: these dims, "
                                                           "scored against that concept)"),
    method: str = typer.Option("ablate", "--method", help="ablate (zero weights; LM: the writers of the stream) | prune (remove dims) | "
                                                         "blind (LM: the readers after the anchored site)"),
    k: float = typer.Option(2.0, "--k", help="selectivity exponent"),
    site: str = typer.Option("latent", "--site", show_default=False,
                             help="module path whose dims to delete (default: a colour model's latent, a transformer's "
                                  "anchored sites; an LM takes none: it edits every residual writer, or the readers)"),
    repair_steps: int = typer.Option(0, "--repair-steps", help="LM: then fine-tune every edited model this many steps on "
                                                               "retain passages, the edit put back after each step"),
    repair_lr: Optional[float] = typer.Option(None, "--repair-lr", help="LM: the repair's learning rate "
                                                                        "(default: the run's unlearning.repair_lr)"),
) -> None:
    """Permanently delete a concept or dims from every seed; write an edited run."""
    if method not in ("ablate", "prune", "blind"):
        fail(f"--method must be ablate, prune or blind, not {method!r}")
    _edit_spec(method, method, concept or "?", dims, "constant", k, site)  # the options, before the run loads
    if out_dir.resolve().is_relative_to(run_dir.resolve()):  # the edited run would sit inside the one it came from
        fail(f"--out {str(out_dir)!r} is inside the source run {str(run_dir)!r}; write the edited run elsewhere")
    refuse_unfinished(run_dir)  # then the config: what it alone rules out is refused before the models load
    try:
        cfg = lifecycle.run_config(run_dir)
    except AnchoringError as e:
        fail(str(e))
    if concept is None and dims is None:
        concept = _only_concept(cfg)
    spec = _edit_spec(method, method, concept, dims, "constant", k, site)
    renamed = (f"intervention {method!r}: ", f"delete --method {method}: ")  # the checks name the spec, here the method
    kind = kind_of(cfg)
    given = {"repair_steps": repair_steps, "repair_lr": repair_lr}
    if any(value not in (None, 0) and name not in kind.delete_options for name, value in given.items()):
        fail(f"--repair-steps and --repair-lr are for {kinds_with(lambda k: 'repair_steps' in k.delete_options)} runs; "
             f"this is a {cfg.kind!r} run")
    options = {name: value for name, value in given.items() if name in kind.delete_options}
    try:
        kind.check_delete(cfg, spec, **options)
    except AnchoringError as e:
        fail(str(e).replace(*renamed, 1))
    run = open_run(run_dir, finished=True)
    bar = "progress" in kind.delete_options and sys.stderr.isatty()
    with progress_bar("repair and score" if repair_steps else "score", bar) as update:  # the kind checks the options itself
        if "progress" in kind.delete_options:
            options["progress"] = update
        _apply_edit(lambda: kind.delete(run, spec, out_dir, **options), renamed=renamed)


@app.command("relearn")
def relearn_cmd(
    run_dir: Path = typer.Argument(..., help="finished run directory (its concept is deleted, then fine-tuned)"),
    concept: Optional[str] = typer.Option(None, "--concept", help="concept to delete (colour default: red; an LM run: its own)"),
    samples: Optional[str] = typer.Option(None, "--samples", help="K values: concept samples (colour; default 1,4,16,64) or "
                                                                   "forget passages (LM; default unlearning.relearn_k) to fine-tune on"),
    steps: Optional[int] = typer.Option(None, "--steps", help="fine-tuning steps (colour: 200; LM: unlearning.relearn_steps)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="fine-tuning rate (colour: 0.01; LM: unlearning.relearn_lr)"),
    eval_chars: Optional[int] = typer.Option(None, "--eval-chars", help="LM: validation characters the curves are scored on "
                                                                        "(default unlearning.eval_chars)"),
    repair_steps: Optional[int] = typer.Option(None, "--repair-steps", help="LM: repair every edit this many steps on retain "
                                                                            "passages first (default unlearning.repair_steps)"),
    repair_lr: Optional[float] = typer.Option(None, "--repair-lr", help="LM: the repair's rate (default unlearning.repair_lr)"),
    distil_steps: Optional[int] = typer.Option(None, "--distil-steps", help="LM: also distil anchoring's deletion into a fresh "
                                                                            "model this many steps: two more rows, the distilled "
                                                                            "deletion and the same distillation of the unedited "
                                                                            "model (default unlearning.distil_steps)"),
    distil_noise: Optional[float] = typer.Option(None, "--distil-noise", help="LM: how far the student starts towards a fresh "
                                                                              "model, in (0, 1] (default unlearning.distil_noise)"),
    distil_lr: Optional[float] = typer.Option(None, "--distil-lr", help="LM: the distillation's peak rate (default "
                                                                        "unlearning.distil_lr)"),
    attack_unedited: Optional[bool] = typer.Option(None, "--attack-unedited/--no-attack-unedited", help="LM: also attack each "
                                                   "method's unedited model, and count kept from where that attack takes it "
                                                   "(default unlearning.attack_unedited)"),
    retain: Optional[int] = typer.Option(None, "--retain", help="colour: extra random colours mixed in (retain data; default 0)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="colour: concept MSE at which it counts as recovered "
                                                                        "(default 0.01)"),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline", help="colour: also attack a post-hoc (unanchored) "
                                                                                   "baseline (default: yes)"),
) -> None:
    """Relearning attack: delete the concept, fine-tune on K of its examples, see what comes back.

    Colour runs: steps until the concept's error falls back under --threshold. LM runs: the unlearning
    table of the run's own arms (forget/retain loss after each method, relearned loss, steps to recover),
    as `unlearning.enabled` computes it after training; it needs the control arm."""
    ks = None if samples is None else (_dims(samples, "--samples", "1,4,16", distinct=True) or [])
    run = open_run(run_dir, finished=True)
    given = {"concept": concept, "samples": ks, "steps": steps, "lr": lr, "eval_chars": eval_chars,
             "repair_steps": repair_steps, "repair_lr": repair_lr, "distil_steps": distil_steps, "distil_noise": distil_noise,
             "distil_lr": distil_lr, "attack_unedited": attack_unedited, "retain": retain,
             "threshold": threshold, "baseline": baseline}
    with progress_bar(kind_of(run.config).relearn_label, sys.stderr.isatty()) as update:
        _apply_edit(lambda: kind_of(run.config).relearn(run, **{k: v for k, v in given.items() if v is not None},
                                                        progress=update), "the attack")
