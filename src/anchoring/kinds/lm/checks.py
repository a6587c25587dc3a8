"""Everything an LM run can refuse before it trains: memory, the model's shape against the terms, the
schedule, the arms, and the corpus, split and labels it would learn from and be scored on. Each
failure is one line naming the key to change, raised before the run directory exists, so that a
mistake costs seconds rather than the hours of training before the evaluation that would trip on it."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from anchoring.anchor import Capture
from anchoring.domains.text.labelling import concept_spans
from anchoring.errors import AnchoringError
from anchoring.kinds.arms import refuse_repeated_seeds
from anchoring.kinds.lm import evaluate as ev
from anchoring.kinds.lm.baselines import forget_masks
from anchoring.kinds.lm.config import WEAK_LABEL_ARMS, LMExperiment
from anchoring.kinds.lm.data import LMData, load_data
from anchoring.kinds.lm.direction import measured_direction
from anchoring.kinds.lm.training import build_model, build_objective, build_timeline, check_compile, device_of, self_labeller
from anchoring.models.ngpt import training_bytes
from anchoring.resources import check_fits


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
        for arm in cfg.lm.arms:  # a filtered arm may remove nearly everything (e.g. text.false_positives = 1)
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
