"""One LM training step (`LMTask`) on the tests' tiny corpus: what every arm of a seed shares,
what each seed draws for itself, how the scheduled weights enter the loss, the weights back on
the sphere, and the route's mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchoring import experiments
from anchoring.anchor import Capture
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.training import LMTask, routed, term_columns, train_arm
from test_lm_kind import SCHEDULE, tiny_spans, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm-training") / "texts", files=2, paragraphs=80)


def test_every_arm_of_a_seed_starts_from_the_same_weights_and_seeds_differ(corpus):
    """Arms are compared as if only their training differed; a different start would confound that."""
    cfg = experiments.load("lm-unlearning", tiny_spans(corpus, "train.steps=4"))
    data = load_data(cfg.text)
    arms = ["anchored", "control", "weak-filtered", "oracle-filtered", "sgtm", "routing"]
    start = {arm: LMTask(cfg, data, 0, arm).model.state_dict() for arm in arms}
    ref = start["control"]
    for arm in arms:
        shared = [k for k in ref if k in start[arm] and start[arm][k].shape == ref[k].shape]
        widened = sorted({k.split(".mlp.")[0] for k in ref if k not in shared})  # routing: its routed MLPs only
        assert widened == ([f"blocks.{i}" for i in cfg.routing.layers] if arm == "routing" else []), arm
        assert all(torch.equal(start[arm][k], ref[k]) for k in shared), arm
    other = LMTask(cfg, data, 1, "control").model.state_dict()
    assert not torch.equal(other["embed.weight"], ref["embed.weight"])


def test_each_seed_trains_on_its_own_draw_of_weak_labels(corpus):
    cfg = experiments.load("lm-anchor", tiny_spans(corpus, "text.coverage=0.5", "train.seeds=2"))
    data = load_data(cfg.text)
    assert not np.array_equal(data.weak(0), data.weak(1))  # the check below could not fail otherwise
    for seed in (0, 1):
        assert np.array_equal(LMTask(cfg, data, seed, "anchored").labels, data.weak(seed)), seed


def test_each_arm_trains_on_its_passages_for_every_seed_and_only_the_anchored_arm_anchors(corpus):
    """A filtered arm of seed 1 that removed seed 0's weak set, an oracle filter that read the labels of
    the wrong passages, or a filtered arm that also anchored, all trained without a word."""
    cfg = experiments.load("lm-unlearning", tiny_spans(corpus, "text.coverage=0.5", "train.seeds=2"))
    data = load_data(cfg.text)
    ref = data.reference[data.parts["train"]]
    assert ref.any() and not ref.all() and not np.array_equal(data.weak(0), data.weak(1))
    for seed in (0, 1):
        tasks = {arm: LMTask(cfg, data, seed, arm) for arm in cfg.lm.arms}
        assert np.array_equal(tasks["weak-filtered"].stream.keep, data.weak(seed) == 0), seed
        assert np.array_equal(tasks["oracle-filtered"].stream.keep, ref == 0), seed
        assert all(tasks[arm].stream.keep.all() for arm in cfg.lm.arms if not arm.endswith("-filtered"))
        assert tasks["anchored"].terms and all(tasks[arm].terms == [] for arm in cfg.lm.arms if arm != "anchored")


def test_a_windows_line_labels_are_its_passages_and_unused_slots_are_unlabelled(corpus):
    """Rows hold different numbers of passages; the slots past a row's last one took passage 0's label,
    so the logged count of labelled passages grew fivefold whenever passage 0 was labelled."""
    cfg = experiments.load("lm-anchor", tiny_spans(corpus))
    data = load_data(cfg.text)
    stream = LMTask(cfg, data, 0, "control").stream
    labels = np.ones(len(data.parts["train"]), dtype=np.int64)  # every passage labelled, passage 0 too
    for step in range(3):
        b = stream.batch(step, 8, labels)
        used = b.line.max(1).values + 1  # lines per row
        assert (used < b.line_labels.shape[1]).any(), "every row has as many lines as the widest (the check could not fail)"
        for row in range(len(b.line)):
            assert b.line_labels[row, :used[row]].eq(1).all() and b.line_labels[row, used[row]:].eq(0).all(), (step, row)


def _stepped(cfg, data, step: int, arm: str = "anchored") -> tuple[LMTask, torch.Tensor | None]:
    """The task after one step, and the route's mask during it (the route forgets it on leaving)."""
    task = LMTask(cfg, data, 0, arm)
    with Capture(task.model, [t.site.module for t in task.terms]) as cap, routed(task) as route:
        task.cap, task.route = cap, route
        task.step(step)
        return task, None if route is None else route.mask


def test_the_logged_loss_is_the_task_plus_each_term_at_its_scheduled_weight(corpus):
    cfg = experiments.load("lm-anchor", tiny_spans(corpus, "train.steps=400")).model_copy(update={"schedule": SCHEDULE})
    data = load_data(cfg.text)
    probe = LMTask(cfg, data, 0, "anchored")  # SCHEDULE: anchor 0.5, anti-subspace 1.0 from step 20 on
    step = next(s for s in range(20, 200) if probe.stream.batch(s, cfg.lm.batch_size, probe.labels).labels.any())
    task, _ = _stepped(cfg, data, step)
    row = dict(zip(task.names, task.rows[step]))
    terms = term_columns(task.names)
    weights = [row[t.weight] for t in task.terms]
    assert len(terms) == len(task.terms) >= 2 and 0.5 in weights and all(row[n] > 0 for n in terms)
    expected = row["task"] + sum(row[t.weight] * row[t.name] for t in task.terms)
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["loss"] != pytest.approx(row["task"] + sum(row[n] for n in terms), rel=1e-3)  # the weights matter


def test_training_leaves_the_weights_on_the_sphere(corpus):
    """nGPT's matrices keep unit rows; a step of Adam moves them off, so every step puts them back."""
    cfg = experiments.load("lm-anchor", tiny_spans(corpus, "train.steps=5", 'lm.arms=["control"]'))
    model = train_arm(cfg, load_data(cfg.text), 0, "control").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.normalize_weights()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k


def test_the_route_takes_the_labelled_positions(corpus):
    cfg = experiments.load("lm-anchor", tiny_spans(corpus, "lm.route=true", "train.steps=10"))
    data = load_data(cfg.text)
    for step in (0, 3):
        task, mask = _stepped(cfg, data, step)
        b = task.stream.batch(step, cfg.lm.batch_size, task.labels, task.rows_of_rank)
        assert b.labels.any() and not b.labels.all()
        assert torch.equal(mask, b.labels.bool()), step
