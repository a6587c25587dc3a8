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
import torch.nn.functional as F

from anchoring import runs
from anchoring.anchor import Capture
from anchoring.domains.text.labelling import concept_spans
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import mark_infinite, median, target_median, target_text
from anchoring.kinds.arms import refuse_repeated_seeds, write_arms
from anchoring.kinds.base import Kind
from anchoring.kinds.lm import evaluate as ev
from anchoring.kinds.lm import figures as lf
from anchoring.kinds.lm.baselines import forget_masks
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import LMData, load_data
from anchoring.kinds.lm.training import (
    ArmResult,
    build_model,
    build_objective,
    build_timeline,
    check_compile,
    device_of,
    self_labeller,
    term_columns,
    train_arm,
)
from anchoring.models.ngpt import training_bytes
from anchoring.report import html
from anchoring.report.figures import save as save_fig
from anchoring.resources import check_fits, release_freed_memory
from anchoring.train.checkpoint import CHECKPOINT, steps_done
from anchoring.train.skeleton import TrainingInterrupted
from anchoring.train.workers import job_progress, run_jobs_reporting, stop_asked

Progress = Callable[[int, int], None]
ARCH_KIND = "lm-ngpt"


def arms(cfg: LMExperiment) -> list[str]:
    return list(cfg.lm.arms)


def memory_estimate(cfg: LMExperiment, held: bool = True) -> int:
    """Bytes the training processes hold at once (`models.ngpt.training_bytes`), with the processes
    that train side by side; on top (`held`), every finished model, which a run holds until all are
    evaluated and saved (a sweep's shard does not)."""
    m = cfg.lm
    vocab = cfg.text.bpe_vocab if cfg.text.tokenizer == "bpe" else 256
    jobs = len(m.arms) * cfg.train.seeds
    side_by_side = m.nproc if m.nproc > 1 else min(jobs, m.workers or os.cpu_count() or 1)
    return training_bytes(vocab, m.width, m.layers, m.mlp_hidden or m.mlp_ratio * m.width,
                          m.batch_size // m.nproc * m.tokens, side_by_side, jobs if held else 0)


def validate(cfg: LMExperiment, data: bool = True) -> int:
    """Everything checkable before training: memory, model shape, terms against the model (sites exist,
    axes/dims fit the width), schedule, arms; then the corpus, split and labels. Returns the steps."""
    refuse_repeated_seeds(cfg.train.member_seeds())
    check_fits(memory_estimate(cfg), f"{cfg.name} (width {cfg.lm.width}, {cfg.lm.layers} layers, batch "
               f"{cfg.lm.batch_size} × {cfg.lm.tokens} tokens)", "lower lm.batch_size, lm.context or the model's size, "
               "lm.workers, or the seeds and arms (every finished model is held until the run is saved)")  # before the check below builds a model
    device_of(cfg)  # a device that is not there fails here, before the run directory exists
    check_compile(cfg)  # and so does train.compile without a C++ compiler
    model = build_model(cfg, 8)  # the vocabulary does not change what the terms can bind to
    objective = build_objective(cfg, model)
    steps = build_timeline(cfg, objective).steps
    with torch.no_grad(), Capture(model, objective.modules) as cap:
        model(torch.zeros(1, 4, dtype=torch.long))
        for t in objective.terms:
            t.site.read(cap.acts)
    if "sgtm" in cfg.lm.arms:
        forget_masks(model, cfg)  # forget heads / units fit the model
    if "routing" in cfg.lm.arms:
        build_model(cfg, 8, "routing")
    if "anchored" in cfg.lm.arms and not objective.terms:
        raise AnchoringError("arm 'anchored' needs terms (this experiment has none); use arms = ['control']")
    if cfg.lm.route and "anchored" in cfg.lm.arms and not any(t.kind in ("anchor", "subspace") for t in objective.terms):
        raise AnchoringError("lm.route needs an anchor or subspace term: there is no anchored site to route through")
    concept = cfg.evaluate.concept or cfg.text.concept
    if concept != cfg.text.concept:
        raise AnchoringError(f"evaluate.concept {concept!r}: only text.concept ({cfg.text.concept!r}) is labelled")
    if cfg.interventions:
        raise AnchoringError("LM runs take no [[interventions]] yet (use `load_run(...).alignment` to inspect the anchor)")
    pulls = [t for t in objective.terms if t.concept == cfg.text.concept and t.kind == "anchor"]
    for t in pulls[1:]:  # alignment, probes and edits use one direction at every site
        if not torch.allclose(F.normalize(t.direction, dim=-1), F.normalize(pulls[0].direction, dim=-1), atol=1e-6):
            raise AnchoringError(f"the anchor terms of {cfg.text.concept!r} pull towards different directions at "
                                 f"{pulls[0].site.module} and {t.site.module}; an LM run measures and edits one direction "
                                 f"per concept, so give every term the same one (or none, to use the concept's anchor)")
    own = objective.concepts.get(cfg.text.concept)
    for j, t in enumerate(cfg.terms):  # a subspace term's own dims would be pulled into, but never measured or edited
        if t.kind == "subspace" and t.concept == cfg.text.concept and t.dims is not None \
                and (own is None or tuple(t.dims) != tuple(own.dims or ())):
            have = list(own.dims) if own is not None and own.dims else "none"
            raise AnchoringError(f"terms.{j} pulls {cfg.text.concept!r} into dims {list(t.dims)}, but the concept's dims are "
                                 f"{have}; alignment, routing, self-labelling and the edits read the concept's dims, so give "
                                 f"the concept these dims and leave the term's unset")
    if "anchored" in cfg.lm.arms and (cfg.unlearning.enabled or cfg.evaluate.ood):
        measured_direction(cfg, fallback=False)  # both edit the anchored arm along it after training: refuse now
    if "anchored" in cfg.lm.arms and cfg.lm.self_label is not None:
        self_labeller(cfg, objective)  # its errors now, not once the arms before the anchored one have trained
    residual = {"embed", *[f"blocks.{i}" for i in range(cfg.lm.layers)]}  # where alignment is measured and edits act
    odd = sorted({t.site.module for t in objective.terms if t.kind in ("anchor", "subspace")} - residual)
    if odd:
        raise AnchoringError(f"an LM anchors its concept in the residual stream, so anchor and subspace terms need "
                             f"residual-stream anchor sites (embed, blocks.i); {odd[0]!r} is not one")
    if data:
        d = load_data(cfg.text)
        if cfg.unlearning.enabled:
            check_relearnable(cfg, d)
        check_labelled(cfg, d)
        if int(d.reference[d.parts["validation"]].sum()) == 0:
            raise AnchoringError(f"no validation passage carries {cfg.text.concept!r}; concept positions cannot be scored")
        lengths = np.array([len(t) for t in d.train_tokens], dtype=np.int64)
        for arm in arms(cfg):  # a filtered arm may remove nearly everything (e.g. text.false_positives = 1)
            for seed in cfg.train.member_seeds():
                n = int(lengths[d.keep(arm, seed)].sum())
                if n < cfg.lm.tokens + 1:
                    raise AnchoringError(f"arm {arm!r} (seed {seed}) would train on {n:,} tokens, fewer than one window "
                                         f"of {cfg.lm.tokens + 1} tokens: use more text, a shorter lm.window or lm.context "
                                         f"or drop the arm")
        e = cfg.evaluate
        scored = [("evaluate.eval_chars", e.eval_chars)] + ([("unlearning.eval_chars", cfg.unlearning.eval_chars)]
                                                             if cfg.unlearning.enabled else [])
        for key, n in scored:
            check_scored(cfg, d, key, n)
        if e.ood:  # checked now, not after hours of training, on the passages the evaluation draws from
            from anchoring.kinds.lm.ood import heldout_indices

            test = np.asarray(heldout_indices(d, cfg.text.corpus), dtype=np.int64)
            long = sum(len(d.texts[i].strip()) >= e.ood_min_chars for i in test)
            if long < e.ood_passages:
                raise AnchoringError(f"evaluate.ood: only {long} test passages have ≥ {e.ood_min_chars} characters, "
                                     f"{e.ood_passages} asked for (lower evaluate.ood_passages or evaluate.ood_min_chars)")
            if not int(d.reference[test].sum()):
                raise AnchoringError(f"evaluate.ood: no test passage carries {cfg.text.concept!r} to compare after delete")
            if cfg.text.corpus == "shakespeare":  # the Milton set: passages in the training characters, long enough
                from anchoring.domains.text.corpus import load_corpus
                from anchoring.evaluate.ood import long_enough, written_in
                from anchoring.kinds.lm.ood import ood_vocabulary

                milton = long_enough(written_in(load_corpus("milton").texts, ood_vocabulary(d)), e.ood_min_chars)
                if len(milton) < e.ood_passages:
                    raise AnchoringError(f"evaluate.ood: only {len(milton)} Milton passages of ≥ {e.ood_min_chars} characters "
                                         f"are written in the training characters, {e.ood_passages} asked for "
                                         f"(lower evaluate.ood_passages)")
            n_concept = min(e.ood_passages, int(d.reference[test].sum()))
            n_retain = int(len(test) - d.reference[test].sum())
            if "anchored" in cfg.lm.arms and n_retain < n_concept:  # one retain passage matched to each concept passage
                raise AnchoringError(f"evaluate.ood: {n_retain} test passages without {cfg.text.concept!r} to match "
                                     f"{n_concept} with it by length; lower evaluate.ood_passages or use more text")
    return steps


def text_line(cfg: LMExperiment) -> str:
    """What this run read and labelled, from its resolved config: the experiment's description names
    its defaults, which `--set text.…` may have changed."""
    t = cfg.text
    fp = f", false positives {t.false_positives:g}" if t.false_positives else ""
    return (f"This run: corpus {t.corpus}, concept {t.concept}, {t.tokenizer} tokens, weak labels on {t.weak_labels} "
            f"at coverage {t.coverage:g}{fp}.")


def check_labelled(cfg: LMExperiment, d: LMData) -> None:
    """An arm that learns from the weak labels, given none, would learn from no label and still be
    reported as a labelled arm: refuse it. Under span labels, the arms that learn from each
    position's label (anchored, SGTM, routing) also need a labelled passage with a word where the
    labeller fires, since only those positions are marked; the weak filter drops whole passages."""
    users = [a for a in cfg.lm.arms if a in WEAK_LABEL_ARMS]
    if not users:
        return
    train, concept = d.parts["train"], cfg.text.concept
    per_position = [a for a in users if a != "weak-filtered"] if cfg.text.weak_labels == "spans" else []
    for seed in cfg.train.member_seeds():
        weak = np.flatnonzero(d.weak(seed))
        if not len(weak):
            carry = int(d.reference[train].sum())
            raise AnchoringError(f"seed {seed}: no training passage carries a weak label for {concept!r} (text.coverage = "
                                 f"{cfg.text.coverage:g} of the {carry:,} training passages that carry it), so arm "
                                 f"{users[0]!r} would learn from no label; raise text.coverage or train only arms that "
                                 f"use no labels (control, oracle-filtered)")
        if per_position and not any(concept_spans(d.texts[train[i]], concept) for i in weak):
            raise AnchoringError(f"seed {seed}: none of the {len(weak):,} weakly labelled training passages has a word "
                                 f"of {concept!r} to mark, so under text.weak_labels = 'spans' arm {per_position[0]!r} "
                                 f"would learn from no label; raise text.coverage or use text.weak_labels = 'passages'")


def check_relearnable(cfg: LMExperiment, d: LMData, key: str = "unlearning.relearn_k", fix: str = "") -> None:
    """The relearning attack fine-tunes on K training passages that carry the concept: there must be
    some, and at least the largest K, or the attack would run on fewer than it says (`key`: the
    name the user gave K under; `fix`: what to do, where that is not to change `key`)."""
    n = int(d.reference[d.parts["train"]].sum())
    if not n:
        raise AnchoringError(f"unlearning: no training passage carries {cfg.text.concept!r}, so there is nothing to "
                             f"relearn from")
    k = max(cfg.unlearning.relearn_k)
    if k > n:
        raise AnchoringError(f"{key}: K = {k:,} asks for more passages than the {n:,} training passages that carry "
                             f"{cfg.text.concept!r}; {fix or 'use'} K ≤ {n:,}")


def check_scored(cfg: LMExperiment, d: LMData, key: str, n: int, fix: str | None = None) -> None:
    """The first `n` validation characters (config key `key`) must hold passages with and without the
    concept, and a word of it, or every concept number scored on them is made up. `fix`: what to do
    about it, where the config cannot be changed (a finished run)."""
    order = cfg.evaluate.order
    fix = fix or (f"raise {key}" if order == "shuffled" else f"set evaluate.order = \"shuffled\" or raise {key}")
    passages = ev.eval_passages(d, n, order=order)
    ref = d.reference[passages]
    if not ref.any() or ref.all():
        which = f"no passage with {cfg.text.concept!r}" if not ref.any() else "no passage without it"
        raise AnchoringError(f"the {n:,} validation characters scored ({key}, evaluate.order = {order!r}) hold "
                             f"{which}; {fix}")
    if not any(concept_spans(d.texts[i], cfg.text.concept) for i in np.asarray(passages)[ref.astype(bool)]):
        # a reference label can come from elsewhere (sentiment, metadata) than the words that mark positions
        raise AnchoringError(f"the {n:,} validation characters scored ({key}) hold passages with "
                             f"{cfg.text.concept!r} but no word of it, so there are no concept positions to "
                             f"score; {fix}")


def measured_direction(cfg: LMExperiment, fallback: bool = True) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """The concept's anchor (axis or vector), else its dims: what alignment is measured against, in every arm.
    A run that anchors nothing is measured along axis 0 for reference; with `fallback=False` (an edit
    needs the concept's own direction) it is an error instead."""
    model = build_model(cfg, 8)
    objective = build_objective(cfg, model)
    anchors = objective.anchors(cfg.text.concept)  # what the anchor terms actually pull towards (a term's own
    if anchors:                                    # direction wins over the concept's), as training uses it
        return anchors[0][1].clone(), None
    c = objective.concepts.get(cfg.text.concept)
    if c is not None and c.anchor is not None:
        return torch.tensor(c.anchor), None
    if c is not None and c.dims:
        return None, c.dims
    if not fallback:  # axis 0 is where alignment is read for reference, not the concept
        raise AnchoringError(f"this run anchors nothing for {cfg.text.concept!r} (no anchor, dims or anchor term), "
                             f"so it has no direction to edit")
    v = torch.zeros(cfg.lm.width)
    v[0] = 1.0  # nothing anchored: axis 0, for reference
    return v, None


def anchored_sites(cfg: LMExperiment) -> list[str]:
    model = build_model(cfg, 8)
    return sorted({t.site.module for t in build_objective(cfg, model).terms if t.kind in ("anchor", "subspace")})


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
    from anchoring.kinds.lm.distributed import launched_by_torchrun

    launched = launched_by_torchrun()
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
    results: dict[tuple[str, int], ArmResult] = {}
    for i, (arm, seed) in enumerate(jobs):  # after the pool: each job only loads its finished checkpoint
        done = i * steps
        report = (lambda s, done=done: progress(done + s, total)) if progress and workers == 1 else None
        try:
            results[arm, seed] = train_arm(cfg, data, seed, arm, checkpoint=checkpoint_path(path, arm, seed), progress=report)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(e.step, path) from None
        release_freed_memory()  # or the process grows by each job's freed activations and optimiser state
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


WEAK_LABEL_ARMS = {"anchored", "weak-filtered", "sgtm", "routing"}  # the arms that train on the weak labels


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
        from anchoring.kinds.lm.unlearning import targets as unlearning_targets

        summary["targets"].update(unlearning_targets(summary["unlearning"]))
    mark_infinite(summary["targets"])
    figures(cfg, path, data, results, rows, sites, direction, dims)
    return summary


def better(s2: float, surprisal: float) -> str:
    """Which passage mean separates the set better; equal to the printed three decimals is a tie."""
    if round(s2, 3) == round(surprisal, 3):
        return "tie"
    return "s₂" if s2 > surprisal else "surprisal"


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


def write_report(cfg: LMExperiment, path: Path, summary: dict[str, Any], metric_names: list[str]) -> None:
    figs = path / "figures"
    loss_rows = [[r["arm"], r["seed"], *[r["loss"][k] for k in ("all", "concept", "retain")],
                  *[r["bits"][k] for k in ("all", "concept", "retain")]] for r in summary["models"]]
    sites = list(summary["models"][0]["alignment"])
    al_rows = [[r["arm"], r["seed"], s, *[r["alignment"][s][k] for k in ("concept", "retain", "margin", "containment")]]
               for r in summary["models"] for s in sites]
    pr_rows = [[r["arm"], r["seed"], p["site"], p["auc"], p["auc_without_anchor"]] for r in summary["models"] for p in r["probes"]]
    ev_ = summary["eval"]
    sections = [
        ("Overview", f"<p>{html.html.escape(cfg.description)}</p><p>{html.html.escape(text_line(cfg))}</p>"
                     f"<p>Concept positions: {html.html.escape(ev_['concept_positions'])} "
                     f"({ev_['positions']['concept']} positions); retain: {html.html.escape(ev_['retain_positions'])} "
                     f"({ev_['positions']['retain']}); {ev_['passages']} validation passages, {ev_['positions']['all']} "
                     f"positions in all.</p>"),
        ("Validation loss (nats/char, then bits/char)",
         html.table_html(["arm", "seed", "all", "concept", "retain", "all (bits)", "concept (bits)", "retain (bits)"], loss_rows)),
    ]
    timing = summary.get("timing") or {}
    seconds = [[r["arm"], r["seed"], timing.get(f"{r['arm']}-seed{r['seed']}_s")] for r in summary["models"]]
    notes = "".join(f"<p>{html.html.escape(n)}.</p>" for n in run_notes(summary))
    if notes or any(t is not None for *_, t in seconds):
        sections.append(("Training run", notes + html.table_html(["arm", "seed", "training seconds"],
                                                                 [[a, s_, "–" if t is None else float(t)] for a, s_, t in seconds])))
    if summary["targets"]:
        shown = [[k, target_text(target_median(v)) + left_out_note(v), v["met"]] for k, v in summary["targets"].items()]
        note = budget_note(summary)
        sections.append(("Targets", (f"<p>{note}.</p>" if note else "") + html.table_html(["target", "median", "met"], shown)))
    sections += [
        ("Alignment cos(h, anchor) per layer", html.table_html(["arm", "seed", "site", "concept", "retain", "margin",
                                                                "containment"], al_rows)),
        ("Alignment per layer (figure)", html.image_html(figs / "alignment.png", "alignment")),
        ("Linear probes (AUC, concept vs retain positions; fitted on one half of the passages, scored on the other)",
         html.table_html(["arm", "seed", "site", "AUC", "AUC without anchor direction"], pr_rows)),
        ("Training", html.image_html(figs / "training_curves.png", "training curves")),
    ]
    if "ood" in summary:
        o = summary["ood"]
        def f3(x: float | None, spec: str = ".3f") -> str:  # as the command line prints them; undefined: –
            return "–" if x is None or x != x else format(x, spec)

        def s3(x: float | None) -> str:
            return f3(x, "+.3f")

        rows = [[seed, name, f3(t["s2"]), f3(t["surprisal"]), better(t["s2"], t["surprisal"])]
                for seed, table in o["auroc"].items() for name, t in table.items()]
        body = (f"<p>{o['n']} passages per set, scored by the {o['arm']} arm; AUROC of each set against held-out text.</p>"
                + html.table_html(["seed", "set", "AUROC s₂", "AUROC surprisal", "better"], rows)
                + html.image_html(figs / "ood_roc.png", "ROC curves"))
        if o["deleted"]:
            body += ("<p>The anchored arm before and after deleting its direction: mean s₂ of held-out concept "
                     "passages vs the rest, and the AUROC separating them.</p>"
                     + html.table_html(["seed", "concept s₂ before", "retain s₂ before", "AUROC before",
                                        "concept s₂ after", "retain s₂ after", "AUROC after"],
                                       [[d["seed"], s3(d["concept_s2_before"]), s3(d["retain_s2_before"]),
                                         f3(d["auroc_s2_before"]), s3(d["concept_s2"]), s3(d["retain_s2"]),
                                         f3(d["auroc_s2"])] for d in o["deleted"]]))
        sections.append(("Out-of-distribution detection", body))
    if "unlearning" in summary:
        from anchoring.kinds.lm import unlearning as ul

        u = summary["unlearning"]
        header, rows = ul.table(u)
        matched = ". ".join(n for n in (ul.diverged_note(u), ul.matched_note(u), ul.repair_note(u), ul.nothing_kept_note(u),
                                        ul.nothing_to_recover_note(u), ul.r_note(u)) if n)
        body = (f"<p>Nats/char on held-out text. Forget: reference-positive passages (whole, and at concept positions); "
                f"retain: reference-negative passages. Δ = after − before; selectivity = Δforget (concept) / retain cost; "
                f"R = Δforget (concept) / that of the oracle filter against the control. Relearning: "
                f"{u['relearn_steps']} fine-tuning steps on K forget passages, scored on {u['eval_positions']['curves']} "
                f"positions; relearned = lowest concept loss − the control's, kept = share of Δforget that survives. "
                f"{html.html.escape(u['note'])}. {html.html.escape(matched)}{'. ' if matched else ''}"
                f"Curves: {html.html.escape(u['curves'])}.</p>"
                # method and seed in one cell: the first column stays in view when the wide table scrolls
                + html.table_html(["method, seed", *header[2:]],
                                  [[f"{r[0]}, {r[1] if r[1] == 'median' else f'seed {r[1]}'}", *r[2:]] for r in rows])
                + html.image_html(figs / "unlearning_tradeoff.png", "Δforget (concept) against retain cost"))
        if (figs / "relearning_curves.png").is_file():
            body += html.image_html(figs / "relearning_curves.png", "relearning curves")
        sections.append(("Unlearning", body))
    if (figs / "shaded_passages.png").is_file():
        shading = ("red: a larger share of the state in the concept's subspace" if measured_direction(cfg)[1]
                   else "red: towards the anchor, blue: away")
        sections.append((f"Held-out passages shaded by alignment ({shading})",
                         html.image_html(figs / "shaded_passages.png", "shaded passages")))
    sections.append(("Resolved config", f"<pre>{html.html.escape(cfg.to_toml())}</pre>"))
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))


class LMKind(Kind):
    name = "lm"
    config = LMExperiment
    studies = frozenset({"sweep"})

    def validate(self, cfg: LMExperiment) -> None:
        validate(cfg)

    def architecture(self, cfg: LMExperiment) -> dict[str, Any]:
        return architecture(cfg)

    def execute(self, cfg: LMExperiment, path: Path, progress: Progress | None) -> dict[str, Any]:
        return run(cfg, path, progress=progress)

    def has_checkpoint(self, path: Path) -> bool:
        return (path / CHECKPOINT).is_file()

    def open(self, path: Path, cfg: LMExperiment, arch: dict[str, Any], summary: dict[str, Any] | None):
        from anchoring.kinds.lm.model import open_run

        return open_run(path, cfg, arch, summary)

    def summary_lines(self, summary: dict[str, Any]) -> list[Any]:
        return summary_lines(summary)

    def intervene(self, run_, spec):
        from anchoring.kinds.lm import control

        return control.intervene(run_, spec)

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


def left_out_note(t: dict[str, Any]) -> str:
    """What a target line adds when some seeds had no value for it (their median leaves them out)."""
    n = t.get("undefined_seeds") or 0
    treated = "left out" if t.get("undefined_counted_as") is None else f"counted as {t['undefined_counted_as']:g}"
    said = f" ({n} seed{'s' * (n != 1)} undefined, {treated})" if n else ""
    broke = t.get("diverged_seeds") or 0
    return said + (f" ({broke} seed{'s' * (broke != 1)}' attack diverged, left out: not met)" if broke else "")


TARGET_STEPS = 1000  # the budget the LM targets are stated for: every built-in LM schedule's length


def budget_note(summary: dict[str, Any]) -> str | None:
    """A run shortened with --steps is judged against targets meant for the full budget; say so next to
    the MISS lines, so that a first look at 300 steps is not read as the method failing."""
    steps = summary.get("steps")
    if not summary.get("targets") or steps is None or steps >= TARGET_STEPS:
        return None
    return f"the targets are stated for the default budget of {TARGET_STEPS} steps; this run trained {steps}"


def _cell(x: float | None) -> str:
    """A table cell of three decimals; "–" for a value that is undefined (NaN in the run, null once
    summary.json is read back: a class with no positions, a probe with one class)."""
    return "–" if x is None or x != x else f"{x:.3f}"


def run_notes(summary: dict[str, Any]) -> list[str]:
    """Where the run trained and the weak labels it really had: under `anchoring show`'s table and in the report."""
    notes = []
    timing = summary.get("timing") or {}
    if "device" in timing:  # runs written before it was recorded do not say
        notes.append(f"trained on {timing['device']}, torch {timing['torch']}, {timing['processes']} {timing['parallel']} "
                     "(the session that finished the training)")
    labels = summary.get("labels")  # runs written before it was recorded do not say
    trained = summary.get("arms") or [m.get("arm") for m in summary.get("models") or [] if isinstance(m, dict)]
    if labels and set(trained) & WEAK_LABEL_ARMS:  # the control and oracle filter train on none
        per = labels["per_seed"].values()
        line = f"weak labels: coverage {labels['asked']:g} asked, " + ", ".join(f"{c['coverage']:.3f}" for c in per)
        if labels["kind"] == "spans":
            line += " realised; with a word to mark (what span labels train): " + ", ".join(f"{c['with_a_span']:.3f}" for c in per)
        notes.append(line + " (per seed)")
    return notes


def summary_lines(summary: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    if "edit" in summary:  # a run written by `anchoring delete`
        from anchoring.kinds.lm.control import _table

        e = summary["edit"]
        what = "readers blinded to" if e.get("method") == "blind-readers" else "deleted"
        fixed = f", repaired for {e['repair_steps']} steps on retain text" if e.get("repair_steps") else ""
        return [_table(f"{summary['experiment']}: {what} {e['concept']}{fixed}", summary["edit_rows"]),
                f"largest |h·v| left in the residual stream: {e['max_residual_component']:.2e}"]

    sites = summary.get("anchored_sites") or []
    table = Table(title=f"{summary['experiment']}: validation nats/char" + (" and alignment" if sites else ""))
    timing = summary.get("timing", {})
    cols = ["arm", "seed", "all", "concept", "retain", *[f"{s}\nmargin" for s in sites], *[f"{s}\ncontainment" for s in sites],
            "train\ns"]
    longest = max((len(str(r["arm"])) for r in summary["models"]), default=3)
    for c in cols:  # arm names and header words stay whole at 80 columns, rather than "weak-fil…"
        table.add_column(c, justify="right", min_width=longest if c == "arm" else max(map(len, c.split("\n"))))
    listed = [table.title + " (one line per model: the terminal is too narrow for the table):"]
    for r in summary["models"]:
        seconds = timing.get(f"{r['arm']}-seed{r['seed']}_s")
        cells = [r["arm"], str(r["seed"]), *[_cell(r["loss"][k]) for k in ("all", "concept", "retain")],
                 *[_cell(r["alignment"][s]["margin"]) for s in sites],
                 *[_cell(r["alignment"][s]["containment"]) for s in sites],
                 "–" if seconds is None else f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"]
        table.add_row(*cells)
        listed.append(f"{cells[0]}, seed {cells[1]}: " + ", ".join(f"{c.replace(chr(10), ' ')} {v}" for c, v in zip(cols[2:], cells[2:])))
    from anchoring.kinds.lm.unlearning import TableOrList

    lines: list[Any] = [TableOrList(table, listed), *run_notes(summary)]
    if note := budget_note(summary):
        lines.append(note)
    for name, t in summary.get("targets", {}).items():
        lines.append(f"{'met ' if t['met'] else 'MISS'}  {name}: {target_text(target_median(t))}{left_out_note(t)}")  # None: NaN read back from JSON
    if summary.get("unlearning"):
        from anchoring.kinds.lm import unlearning as ul

        lines += ul.lines(summary["unlearning"])
    o = summary.get("ood")
    if o:
        for seed, table in o["auroc"].items():
            shown = ", ".join(f"{k} {t['s2']:.3f} / {t['surprisal']:.3f}" for k, t in table.items())
            lines.append(f"OOD AUROC ({o['arm']}, seed {seed}), s₂ / surprisal: {shown}")
        for d in o["deleted"]:
            lines.append(f"after delete (seed {d['seed']}): concept passages s₂ {d['concept_s2']:+.3f} "
                         f"(before {d['concept_s2_before']:+.3f}), retain {d['retain_s2']:+.3f} "
                         f"(before {d['retain_s2_before']:+.3f}), AUROC {d['auroc_s2']:.3f} (before {d['auroc_s2_before']:.3f})")
    return lines
