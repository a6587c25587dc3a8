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
def test_anchoring_a_gru_puts_the_concept_on_the_axis_and_deleting_it_is_selective(tmp_path):
    E = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numbers below are those of one thread
    figure = tmp_path / "alignment.png"
    try:
        r = E.run(E.load_passages("shakespeare", 2000, 0), steps=500, figure=str(figure))  # about 40 s
    finally:
        torch.set_num_threads(threads)
    import matplotlib.image as mpimg

    img = mpimg.imread(figure)[..., :3]  # the figure is there and shows both histograms (red and blue bars)
    assert ((img[..., 0] > 0.8) & (img[..., 2] < 0.6)).sum() > 100 and ((img[..., 2] > 0.7) & (img[..., 0] < 0.5)).sum() > 100
    assert not list(tmp_path.glob("*.tmp.png"))
    anchored, control = r["anchored"], r["control"]
    # measured: margin +0.164 against the control's -0.008; deletion +0.101 at concept positions, +0.017 on retain
    assert anchored["margin"] > control["margin"] + 0.08  # the sparse labels moved the concept onto the axis
    assert r["anchored, axis deleted"]["margin"] == 0.0  # the edited weights write nothing along the axis
    assert abs(r["anchored, suppressed"]["margin"]) < anchored["margin"] / 4
    deleted = r["anchored, axis deleted"]
    d_concept = deleted["concept nats"] - anchored["concept nats"]
    d_retain = deleted["retain nats"] - anchored["retain nats"]
    assert d_concept > 0.05 and d_concept > 3 * d_retain  # the deletion hits the concept more than retain text


def test_the_example_refuses_what_it_cannot_measure_before_training():
    E = _example()
    passages = ["He stabs him with his dagger.", "A fair morning in the garden."] * 20
    with pytest.raises(SystemExit, match="coverage 0.0 must be in"):
        E.run(passages, coverage=0.0, steps=1)
    with pytest.raises(SystemExit, match="no training passage holds a 'violence' word"):  # not "give more passages"
        E.run(["A fair morning in the garden."] * 40, steps=1)
    with pytest.raises(SystemExit, match="no training passage is labelled"):  # words there, none drawn at this coverage
        E.run(["He stabs him with his dagger."] + ["A fair morning in the garden."] * 39, coverage=0.01, steps=1)
    with pytest.raises(SystemExit, match="no retain text to score"):  # scores were NaN
        E.run(["He stabs him with his dagger and kills him."] * 40, steps=1)
    for bad in ("0", "-5"):  # 0 steps or passages scored untrained models
        with pytest.raises(Exception, match="is not ≥ 1"):
            E.positive(bad)
    assert E.positive("3") == 3


def test_the_examples_options_are_checked_before_training(tmp_path):
    E = _example()
    cases = ((E.whole, "-1", "is not ≥ 0"), (E.weight, "nan", "not a finite number"), (E.weight, "-1", "not a finite number"),
             (E.figure_path, str(tmp_path / "x.pdf"), "ending in .png"),  # it wrote PNG bytes into x.pdf
             (E.figure_path, str(tmp_path / "no" / "x.png"), "is not a folder"))  # it failed after training
    for parse, bad, message in cases:
        with pytest.raises(Exception, match=message):
            parse(bad)
    assert E.whole("0") == 0 and E.weight("2.5") == 2.5 and E.figure_path(str(tmp_path / "x.png")).endswith("x.png")
