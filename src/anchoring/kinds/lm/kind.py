"""The language-model experiments (M4): train every (arm, seed), measure, draw, report.

Arms: `anchored` (the terms of the spec), `control` (no terms), `weak-filtered` (no terms; the
weakly labelled training passages removed), `oracle-filtered` (no terms; every reference-positive
training passage removed), and two training-time unlearning baselines (see `baselines`): `sgtm`
(the loss of predicting weakly labelled tokens updates only designated forget entries of each block)
and `routing` (the gradients of positions whose next token is weakly labelled routed into extra MLP
units of early blocks); their deletion
edit is `baselines.ablated`, and the checkpoint keeps the trained, un-ablated models. All arms of a
seed share initial weights (the routing arm's extra units aside), batch stream and labels (see
`data`). Each (arm, seed) is one job with its own resumable checkpoint under `arms/`; jobs run one
after another in this process, or side by side in `lm.workers` processes (one job per process;
torch single-threaded in each). Data parallel (`torchrun … -m anchoring run`, see `distributed`)
instead splits every step's batch over the ranks and runs the jobs one after another.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from anchoring import runs, runtime
from anchoring.evaluate.stats import mark_infinite, median
from anchoring.kinds.arms import train_each, write_arms
from anchoring.kinds.base import Kind
from anchoring.kinds.lm import evaluate as ev
from anchoring.kinds.lm import figures as lf
from anchoring.kinds.lm.checks import memory_estimate, validate
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import LMData, load_data
from anchoring.kinds.lm.direction import anchored_sites, measured_direction
from anchoring.kinds.lm.report import summary_lines, write_report
from anchoring.kinds.lm.training import (
    ArmResult,
    device_of,
    term_columns,
    train_arm,
)
from anchoring.report.figures import save as save_fig
from anchoring.resources import release_freed_memory
from anchoring.train.checkpoint import CHECKPOINT, steps_done
from anchoring.train.skeleton import TrainingInterrupted
from anchoring.train.workers import job_progress, run_jobs_reporting, stop_asked

Progress = Callable[[int, int], None]
ARCH_KIND = "lm-ngpt"


def arms(cfg: LMExperiment) -> list[str]:
    return list(cfg.lm.arms)


def architecture(cfg: LMExperiment) -> dict[str, Any]:
    d = load_data(cfg.text)
    return {"kind": ARCH_KIND, **cfg.lm.model_dump(mode="json"), "vocab": d.vocab_size, "tokenizer": cfg.text.tokenizer,
            "seeds": cfg.train.member_seeds(), "arms": arms(cfg)}


def checkpoint_path(path: Path, arm: str, seed: int) -> Path:
    return path / "arms" / f"{arm}-seed{seed}.safetensors"


def run(cfg: LMExperiment, path: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    steps = validate(cfg)
    data = load_data(cfg.text, path)  # saves (or, resuming, reads) the run's tokenizer
    seeds = cfg.train.member_seeds()
    jobs = [(arm, seed) for seed in seeds for arm in arms(cfg)]
    total = steps * len(jobs)
    workers = 1 if cfg.lm.nproc > 1 else min(len(jobs), cfg.lm.workers or os.cpu_count() or 1)
    so_far = {j: steps_done(checkpoint_path(path, *j)) for j in jobs}
    todo = [j for j in jobs if so_far[j] < steps]  # empty: a merged sweep, a finished resume
    t0 = time.perf_counter()
    launched = runtime.launched_by_torchrun()
    if launched:  # rank 0 of torchrun's workers; the others train in `distributed.follow`
        from anchoring.kinds.lm.distributed import train_as_torchrun_rank

        train_as_torchrun_rank(cfg, path, jobs)
        workers = launched[1]
    elif cfg.lm.nproc > 1 and todo:  # every job finished (a resume stopped in evaluation): no ranks to start
        from anchoring.kinds.lm.distributed import train_data_parallel

        try:
            train_data_parallel(cfg, path, todo, cfg.lm.nproc, progress, total, so_far)
        except KeyboardInterrupt:  # the ranks saved where they stopped: say where, as one process does
            stopped_at = next((n for n in (steps_done(checkpoint_path(path, *j)) for j in todo) if n < steps), 0)
            raise TrainingInterrupted(stopped_at or -1, path) from None  # -1: stopped before any step was saved
        workers = cfg.lm.nproc  # the ranks reported their progress; the loop below only loads their checkpoints
    elif workers > 1:  # a job already at its last step (a resumed run, a merged sweep) needs no process
        _train_in_processes(cfg, path, todo, workers, progress, total, so_far)
    results: dict[tuple[str, int], ArmResult] = train_each(  # after the pool or the ranks: each job only loads
        jobs, steps, lambda arm, seed, report: train_arm(cfg, data, seed, arm, checkpoint=checkpoint_path(path, arm, seed),
                                                         progress=report), progress, path, here=workers == 1)
    train_s = time.perf_counter() - t0
    summary = finish(cfg, path, data, results, progress)
    # each job's own seconds in training steps (kept in its checkpoint, so worker processes and resumes count)
    timing = {f"{arm}-seed{seed}_s": None if math.isnan(r.seconds) else round(r.seconds, 3)
              for (arm, seed), r in results.items()}
    # where every job came finished (a merged sweep, a resume after the last step) this process only loaded
    # checkpoints: its seconds are no training time, and it cannot say where the jobs' own seconds were spent
    summary["timing"] = {"train_s": round(train_s, 3)} if todo else {"train_s": None, "load_s": round(train_s, 3)}
    summary["timing"].update(timing)
    if todo:
        summary["timing"].update(trained_on(cfg, workers, "data-parallel ranks" if launched or cfg.lm.nproc > 1 else "job processes"))
    write_report(cfg, path, summary, next(iter(results.values())).metric_names)  # after the timing, which it shows
    from anchoring.kinds.lm.unlearning import PARTIAL

    shutil.rmtree(path / PARTIAL, ignore_errors=True)  # the finished evaluation's seeds: all in the summary now
    return summary


def trained_on(cfg: LMExperiment, processes: int, how: str) -> dict[str, Any]:
    """Where the seconds above were spent: `train.device = "auto"` leaves the config silent on it, and
    a time means little without the device, the torch build and the number of processes. A resumed
    run reports the session that finished it."""
    dev = device_of(cfg)
    name = f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "processes": processes, "parallel": how if processes > 1 else "process"}


def _train_job(cfg: LMExperiment, path: Path, arm: str, seed: int) -> None:
    train_arm(cfg, load_data(cfg.text, path), seed, arm, checkpoint=checkpoint_path(path, arm, seed),
              progress=job_progress((arm, seed)), should_stop=stop_asked)
    release_freed_memory()  # a worker trains job after job


def _train_in_processes(cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]], workers: int,
                        progress: Progress | None, total: int, done: dict[tuple[str, int], int]) -> None:
    """One process per (arm, seed) job, all stopping together, their steps summed into `progress`
    (`train.workers.run_jobs_reporting`; `done`: every job's steps so far, finished ones included)."""
    try:
        run_jobs_reporting(_train_job, [(cfg, path, arm, seed) for arm, seed in jobs], workers, progress, total, done)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(e.step, path) from None


def write_weights(path: Path, models: dict[tuple[str, int], torch.nn.Module]) -> None:
    write_arms(path, models, "anchoring-lm-1")


def label_coverage(data: LMData, seeds: list[int]) -> dict[str, Any]:
    """What the weak labels really cover, per seed: the share of reference-labelled training passages
    that carry a weak label, and, with span labels, the share that also holds a word to mark. A
    passage labelled for its sentiment or metadata alone has none, and trains as unlabelled text
    (deception at 30% trains at about 17%)."""
    ref = data.reference[data.parts["train"]].astype(bool)
    spans = data.span_masks()
    marked = None if spans is None else np.array([bool(m.any()) for m in spans])
    out: dict[str, Any] = {"asked": data.text.coverage, "kind": data.text.weak_labels, "per_seed": {}}
    for seed in seeds:
        weak = data.weak(seed).astype(bool) & ref
        n = max(int(ref.sum()), 1)
        out["per_seed"][str(seed)] = {"coverage": float(weak.sum() / n),
                                      "with_a_span": None if marked is None else float((weak & marked).sum() / n)}
    return out


def finish(cfg: LMExperiment, path: Path, data: LMData, results: dict[tuple[str, int], ArmResult],
           progress: Progress | None = None) -> dict[str, Any]:
    """Write the metrics and weights, evaluate every model and, when asked, the unlearning methods (whose
    fine-tuning steps go to `progress`)."""
    names = arms(cfg)
    frames = []
    for (arm, seed), r in results.items():
        df = pd.DataFrame(r.metrics, columns=r.metric_names)
        df.insert(0, "arm", arm)
        df.insert(0, "seed", seed)
        df.insert(0, "step", np.arange(len(df)))
        frames.append(df)
    runs.write_atomic(path / runs.METRICS, pd.concat(frames).to_csv(index=False, float_format="%.8g"))
    write_weights(path, {k: r.model for k, r in results.items()})

    direction, dims = measured_direction(cfg)
    sites = ["embed", *[f"blocks.{i}" for i in range(cfg.lm.layers)]]
    es = ev.eval_set(data, cfg.lm.tokens, cfg.evaluate.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for (arm, seed), r in results.items():
        m = ev.measure(r.model, es, sites, direction, dims, cfg.evaluate.probe_positions, cfg.evaluate.batch_size)
        rows.append({"arm": arm, "seed": seed, "loss": m["loss"], "bits": m["bits"], "alignment": m["alignment"],
                     "probes": ev.probes(m["features"], m["feature_passages"], direction, dims),
                     "train_task_last100": float(np.nanmean(r.metrics[-100:, r.metric_names.index("task")]))})
        release_freed_memory()
    eval_s = time.perf_counter() - t0
    summary = summarize(cfg, rows, names, es, sites)
    summary["eval_s"] = round(eval_s, 3)
    summary["labels"] = label_coverage(data, sorted({seed for _, seed in results}))
    if cfg.evaluate.ood:
        summary["ood"] = ood(cfg, path, data, results)
    if cfg.unlearning.enabled:
        summary["unlearning"] = unlearning(cfg, path, data, {k: r.model for k, r in results.items()}, progress)
        from anchoring.kinds.lm.unlearning_table import targets as unlearning_targets

        summary["targets"].update(unlearning_targets(summary["unlearning"]))
    mark_infinite(summary["targets"])
    figures(cfg, path, data, results, rows, sites, direction, dims)
    return summary


def ood(cfg: LMExperiment, path: Path, data: LMData, results: dict[tuple[str, int], ArmResult]) -> dict[str, Any]:
    """Out-of-distribution detection with the run's own models (`kinds.lm.ood`), and its ROC figure."""
    from anchoring.evaluate.ood import roc_figure
    from anchoring.kinds.lm.model import LMRun
    from anchoring.kinds.lm.ood import evaluate_ood

    seeds = cfg.train.member_seeds()
    by_arm = {a: [results[a, s].model for s in seeds] for a in arms(cfg)}
    run_ = LMRun(path, cfg, seeds, [m for ms in by_arm.values() for m in ms], None, by_arm, data)
    arm = "control" if "control" in by_arm else next(iter(by_arm))
    e = cfg.evaluate
    res = evaluate_ood(run_, n=e.ood_passages, seed=seeds[0], arm=arm, min_chars=e.ood_min_chars)
    first = res["scores"][str(seeds[0])]
    scores = {k: {m: np.asarray(v[m]) for m in v} for k, v in first.items()}
    save_fig(roc_figure(scores, metrics=("s2", "surprisal"), title=f"{arm} arm, seed {seeds[0]}: held-out text against each set",
                        reference_label=Path(cfg.text.corpus).name), path / "figures" / "ood_roc.png")
    return res


def unlearning(cfg: LMExperiment, path: Path, data: LMData, models: dict[tuple[str, int], torch.nn.Module],
               progress: Progress | None = None, partial: Path | None = None) -> dict[str, Any]:
    """Forget/retain loss per unlearning method and seed, relearning curves (CSV) and their figures,
    written under `path`: after training (`unlearning.enabled`) or on a finished run (`anchoring relearn`).
    Finished methods are kept in `partial` (default `path/unlearning-partial`) until the caller is done."""
    from anchoring.kinds.lm import unlearning as ul

    out = ul.evaluate(cfg, data, models, path, progress, partial=path / ul.PARTIAL if partial is None else partial)
    points = out.pop("curve_points")
    save_fig(lf.unlearning_tradeoff(out["rows"]), path / "figures" / "unlearning_tradeoff.png")
    if any(p["fine_tune"].startswith("relearn") for p in points):
        save_fig(lf.relearning_curves(points, out["relearn_k"]), path / "figures" / "relearning_curves.png")
    return out


def retain_gap(rows: list[dict], bound: float = 0.02) -> dict[str, Any]:
    """The cost of anchoring on retain text, per seed (anchored − control of the same seed), judged on
    the median over seeds: the number the target line prints is the one that decides it."""
    gaps = [a["loss"]["retain"] - c["loss"]["retain"] for a in rows if a["arm"] == "anchored"
            for c in rows if c["arm"] == "control" and c["seed"] == a["seed"]]
    m = median(gaps)
    return {"per_seed": gaps, "median": m, "met": bool(m <= bound)}


def summarize(cfg: LMExperiment, rows: list[dict], names: list[str], es: ev.EvalSet, sites: list[str]) -> dict[str, Any]:
    med: dict[str, Any] = {}
    for a in names:
        mine = [r for r in rows if r["arm"] == a]
        loss = {k: median([r["loss"][k] for r in mine]) for k in ("all", "concept", "retain")}
        med[a] = {"loss": loss, "bits": {k: v / ev.LN2 for k, v in loss.items()},
                  "alignment": {s: {k: median([r["alignment"][s][k] for r in mine]) for k in ("concept", "retain", "margin",
                                                                                              "containment")}
                                for s in sites}}
    anchored = anchored_sites(cfg)
    targets: dict[str, Any] = {}
    if "control" in med:
        c = med["control"]["loss"]["all"]
        targets["control validation loss ≤ 1.60 nats/char"] = {"median": c, "met": c <= 1.60}
    if "anchored" in med and "control" in med:
        targets["retain loss gap (anchored − control) ≤ 0.02"] = retain_gap(rows)
        for s in anchored:
            m = med["anchored"]["alignment"][s]
            targets[f"margin at {s} ≥ 0.3"] = {"median": m["margin"], "met": m["margin"] >= 0.3}
            targets[f"containment at {s} ≤ 0.1"] = {"median": m["containment"], "met": m["containment"] <= 0.1}
    return {"experiment": cfg.name, "upstream": cfg.upstream, "kind": "lm", "arms": names,
            "seeds": cfg.train.member_seeds(), "steps": int(cfg.train.steps or 0) or None,
            "concept": cfg.text.concept, "anchored_sites": anchored, "models": rows, "median": med, "targets": targets,
            # the predicted tokens of each class: the positions whose nats make up the losses above
            "eval": {"passages": len(es.passages), "positions": {
                "concept": int((es.cls[:, 1:] == ev.CONCEPT).sum()), "retain": int((es.cls[:, 1:] == ev.RETAIN).sum()),
                "all": int((es.cls[:, 1:] != ev.PAD).sum())},
                "concept_positions": f"tokens of reference-positive passages overlapping a concept word or the "
                                     f"{cfg.evaluate.after} characters after it",
                "retain_positions": "every token of a reference-negative passage"}}


def figures(cfg: LMExperiment, path: Path, data: LMData, results, rows, sites, direction, dims) -> None:
    figdir = path / "figures"
    curves: dict[str, dict[str, np.ndarray]] = {}
    for (arm, _seed), r in results.items():
        for m in ("task", *term_columns(r.metric_names)):
            curves.setdefault(arm, {}).setdefault(m, []).append(r.metrics[:, r.metric_names.index(m)])
    curves = {a: {m: np.stack(v) for m, v in c.items()} for a, c in curves.items()}
    save_fig(lf.training_curves(curves), figdir / "training_curves.png")
    save_fig(lf.alignment_bars(rows, sites, arms(cfg)), figdir / "alignment.png")
    n = cfg.evaluate.shade_passages
    if n:
        val = [int(i) for i in data.parts["validation"]]
        # n passages: one without the concept for contrast (when n ≥ 2), the rest with it
        pos = [i for i in val if data.reference[i] and len(data.texts[i]) >= 80][: max(1, n - 1)]
        neg = [i for i in val if not data.reference[i] and len(data.texts[i]) >= 80][: 1 if n >= 2 else 0]
        site = (anchored_sites(cfg) or sites[-1:])[0]
        items = []
        seed = cfg.train.member_seeds()[0]
        for arm in [a for a in ("anchored", "control") if (a, seed) in results]:
            model = results[arm, seed].model
            for i in pos + neg:
                text = data.texts[i][:600]
                a, spans = ev.token_alignment(model, data, text, site, direction, dims)
                tag = "concept" if data.reference[i] else "no concept"
                items.append((f"{arm}, seed {seed}, {site}, validation passage {i} ({tag})", text, a, spans))
        if items:
            save_fig(lf.shaded_text(items, what="cos(h, anchor)" if dims is None else "share of h in the subspace"),
                     figdir / "shaded_passages.png")


class LMKind(Kind):
    name = "lm"
    config = LMExperiment
    studies = frozenset({"sweep"})
    nproc_key = "lm.nproc"
    delete_options = frozenset({"repair_steps", "repair_lr", "progress"})
    relearn_label = "unlearning"

    def validate(self, cfg: LMExperiment) -> None:
        validate(cfg)

    def architecture(self, cfg: LMExperiment) -> dict[str, Any]:
        return architecture(cfg)

    def execute(self, cfg: LMExperiment, path: Path, progress: Progress | None) -> dict[str, Any]:
        return run(cfg, path, progress=progress)

    def has_checkpoint(self, path: Path) -> bool:
        return (path / CHECKPOINT).is_file()

    def concepts(self, cfg: LMExperiment) -> list[str]:
        return [cfg.text.concept]  # an LM run labels one concept

    def check_processes(self, cfg: LMExperiment, world: int) -> str | None:
        if cfg.lm.batch_size % world:
            return f"lm.batch_size {cfg.lm.batch_size} does not split over {world} processes: give a multiple of {world}"
        return None

    def follow(self, cfg: LMExperiment, path: Path) -> None:
        from anchoring.kinds.lm import distributed

        distributed.follow(cfg, path)

    def open(self, path: Path, cfg: LMExperiment, arch: dict[str, Any], summary: dict[str, Any] | None):
        from anchoring.kinds.lm.model import open_run

        return open_run(path, cfg, arch, summary)

    def summary_lines(self, summary: dict[str, Any]) -> list[Any]:
        return summary_lines(summary)

    def intervene(self, run_, spec):
        from anchoring.kinds.lm import control

        return control.intervene(run_, spec)

    def check_delete(self, cfg: LMExperiment, spec, **options: Any) -> None:
        from anchoring.kinds.lm import control

        control.check_delete(cfg, spec, **{k: v for k, v in options.items() if k != "progress"})

    def delete(self, run_, spec, out: Path, **options: Any):
        from anchoring.kinds.lm import control

        return control.delete(run_, spec, out, **options)

    def relearn(self, run_, **options: Any):
        from anchoring.kinds.lm import control

        return control.relearn(run_, **options)

    def intervention_lines(self, path: Path) -> list[Any]:
        from anchoring.kinds.lm import control

        return control.intervention_lines(path)

    def attack_lines(self, summary: dict[str, Any]) -> list[Any]:
        from anchoring.kinds.lm import control

        return control.attack_lines(summary)

    # sweeps: a shard trains every (arm, seed) job of a block of seeds (see kinds.lm.shards)
    sweep_figure = ("figures/alignment.png", "alignment per layer")

    def seed_blocks(self, cfg: LMExperiment, n: int) -> list[list[int]]:
        from anchoring.kinds.lm import shards

        return shards.seed_blocks(cfg, super().seed_blocks(cfg, n))

    def shard_memory(self, cfg: LMExperiment) -> int:
        one_at_a_time = cfg.model_copy(update={"lm": cfg.lm.model_copy(update={"workers": 1, "nproc": 1})})
        return memory_estimate(one_at_a_time, held=False)  # a shard keeps checkpoints, not models

    def train_shard(self, cfg: LMExperiment, shard_dir: Path, callbacks=()) -> None:
        from anchoring.kinds.lm import shards

        shards.train_shard(cfg, shard_dir, callbacks)

    def shard_files(self, cfg: LMExperiment, shard_dir: Path) -> list[Path]:
        from anchoring.kinds.lm import shards

        return shards.shard_files(cfg, shard_dir)

    def merge_shards(self, cfg: LMExperiment, shard_dirs: list[Path], path: Path) -> None:
        from anchoring.kinds.lm import shards

        shards.merge_shards(cfg, shard_dirs, path)

    def grid_figures(self, out: Path, results) -> list[tuple[str, Path]]:
        from anchoring.kinds.lm import shards

        return shards.grid_figures(out, results)

    def sweep_row(self, summary: dict[str, Any]) -> dict[str, Any]:
        from anchoring.kinds.lm import shards

        return shards.sweep_row(summary)


KIND = LMKind()

