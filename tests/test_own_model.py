"""The worked example of docs/own-model.md: the method on a model the toolkit does not ship (a GRU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "anchor_your_model.py"


def _example():
    spec = importlib.util.spec_from_file_location("anchor_your_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_split_labels_only_a_share_of_the_concept_passages():
    E = _example()
    passages = ["He stabs him with his dagger.", "A fair morning in the garden.", "They fight and he dies.",
                "Sweet music plays.", "Kill him, kill him!", "Good night, sweet prince."] * 10
    train, held, vocab = E.split(passages, "violence", 0.5, seed=0)
    assert bool((train.ids > 0).all()) and int(train.ids.max()) == vocab - 1  # 0 is kept for unseen characters
    hit_passages = set(train.passage[train.concept].tolist())
    labelled_passages = set(train.passage[train.labels > 0].tolist())
    assert labelled_passages and labelled_passages < hit_passages  # some, not all
    assert bool((train.labels > 0).le(train.concept).all())  # labels only where the labeller fired
    assert not bool((held.labels > 0).any())  # held-out text carries no training label


@pytest.mark.slow
def test_anchoring_a_gru_puts_the_concept_on_the_axis_and_deleting_it_is_selective():
    E = _example()
    torch.set_num_threads(1)
    passages = E.load_passages("shakespeare", 2000, 0)
    r = E.run(passages, steps=300)
    anchored, control = r["anchored"], r["control"]
    assert anchored["margin"] > control["margin"] + 0.01  # the sparse labels moved the concept onto the axis
    assert r["anchored, axis deleted"]["margin"] == 0.0  # the edited weights write nothing along the axis
    assert abs(r["anchored, suppressed"]["margin"]) < anchored["margin"] / 2
    deleted = r["anchored, axis deleted"]
    d_concept = deleted["concept nats"] - anchored["concept nats"]
    d_retain = deleted["retain nats"] - anchored["retain nats"]
    assert d_concept > 0 and d_concept > 1.5 * d_retain  # the deletion hits the concept more than retain text
