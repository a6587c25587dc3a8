"""`lm.self_label`: positions the anchored model itself puts near the axis count as labelled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anchoring import experiments
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.training import build_model, build_objective, self_labeller, train_arm
from test_lm_kind import write_corpus

SIZE = ["lm.width=32", "lm.layers=4", "lm.heads=2", "lm.context=64", "lm.batch_size=8", "train.seeds=1"]


def _cfg(*extra: str):
    return experiments.load("lm-anchor-cleared", [*SIZE, *extra])


def test_positions_past_the_threshold_become_labelled_and_the_rest_keep_their_labels():
    cfg = _cfg("lm.self_label=0.6")
    objective = build_objective(cfg, build_model(cfg, 8))
    label = self_labeller(cfg, objective)
    c = torch.tensor([[0.9, 0.61, 0.59, -0.95], [0.8, 0.0, 0.7, 0.2]])  # cos with axis 0, per position
    rest = F.normalize(torch.randn(2, 4, 31, generator=torch.Generator().manual_seed(0)), dim=-1)
    h = torch.cat([c[..., None], rest * (1 - c[..., None] ** 2).sqrt()], dim=-1) * 3.0  # length must not matter
    pos = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # weak labels
    new, share = label({"blocks.2": h}, pos)
    assert new.tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]  # −0.95 is the other half-space: not labelled
    assert math.isclose(float(share), 3 / 8)  # newly labelled positions only: not the weak one at 0.8 again


def test_off_by_default_and_refused_without_an_anchor():
    cfg = _cfg()
    assert self_labeller(cfg, build_objective(cfg, build_model(cfg, 8))) is None
    clear_only = _cfg("lm.self_label=0.5")
    clear_only = clear_only.model_copy(update={"terms": [t for t in clear_only.terms if t.kind != "anchor"]})
    with pytest.raises(AnchoringError, match="no anchor or subspace term"):
        self_labeller(clear_only, build_objective(clear_only, build_model(clear_only, 8)))
    with pytest.raises(ValueError):
        _cfg("lm.self_label=1.5")


def test_self_labels_change_training_only_from_their_first_step(tmp_path):
    """From `self_label_from` on, the anchored arm trains differently (the pull takes the self-labelled
    positions, the clearing terms leave them) and logs the share it labelled; before it, nothing
    differs. A low threshold makes sure some positions pass it within the few steps."""
    corpus = write_corpus(tmp_path / "texts")
    base = [f'text.corpus="{corpus}"', "text.coverage=0.3", *SIZE, "train.steps=16", "train.checkpoint_every=100"]
    schedule = "STEP,lr,anchor,anti-subspace\n0,0.004,0.5,1.0\n16,0.004,,\n"
    runs = {}
    for name, extra in (("off", []), ("on", ["lm.self_label=0.05", "lm.self_label_from=8"]),
                        ("spare", ["lm.self_label=0.05", "lm.self_label_from=8", 'lm.self_label_mode="spare"'])):
        cfg = experiments.load("lm-anchor-cleared", base + extra).model_copy(update={"schedule": schedule})
        runs[name] = train_arm(cfg, load_data(cfg.text), 0, "anchored")
    off, on = runs["off"], runs["on"]
    col = on.metric_names.index("self_labelled")
    share = on.metrics[:, col]
    assert (share[:8] == 0).all() and (share[8:] > 0).all(), share
    loss = on.metric_names.index("loss")
    assert np.array_equal(on.metrics[:8, loss], off.metrics[:8, loss])  # identical until self-labelling starts
    assert not np.array_equal(on.metrics[8:, loss], off.metrics[8:, loss])
    assert "self_labelled" not in off.metric_names
    # step 8 is computed on the same weights in every run: "pull" changes the anchor's value there,
    # "spare" only the clearing terms' (the anchor still pulls the weak labels alone)
    anchor, clear = on.metric_names.index("anchor@2"), on.metric_names.index("clear@blocks.2")
    spare = runs["spare"]
    assert on.metrics[8, anchor] != off.metrics[8, anchor]
    assert spare.metrics[8, anchor] == off.metrics[8, anchor]
    assert spare.metrics[8, clear] != off.metrics[8, clear] and spare.metrics[8, clear] == on.metrics[8, clear]
    # the other arms of the same config train as usual; their share is NaN (they never self-label), not a divergence
    cfg = experiments.load("lm-anchor-cleared", [*base[:-2], "train.steps=3", "lm.self_label=0.05"])
    control = train_arm(cfg, load_data(cfg.text), 0, "control")
    assert np.isnan(control.metrics[:, control.metric_names.index("self_labelled")]).all()
    assert np.isfinite(control.metrics[:, control.metric_names.index("loss")]).all()
