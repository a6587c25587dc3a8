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
    assert int(train.passage.max()) + 1 == 54 and int(held.passage.max()) + 1 == 6  # 90/10, each passage once


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
    with pytest.raises(SystemExit, match="^error: coverage 0.0 must be in"):
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


def _tiny_passages() -> list[str]:
    return ["He stabs him with his dagger and he dies.", "A fair morning in the garden, and sweet music.",
            "They fight; the soldier kills the captain.", "Good night, sweet prince, and flights of angels."] * 30


def test_with_both_weights_at_zero_the_two_arms_are_the_same_model():
    """The arms start from the same weights and see the same batches, so with the terms weighted 0 the
    anchored arm trains into exactly the control: any difference in the printed table is the terms'."""
    E = _example()
    r = E.run(_tiny_passages(), steps=3, anchor_weight=0.0, anti_weight=0.0)
    assert r["anchored"] == r["control"]
    r = E.run(_tiny_passages(), steps=3)  # and the terms do change the model
    assert r["anchored"] != r["control"]


def test_per_token_nats_sit_at_the_predicted_token_and_match_a_direct_forward():
    """nats[t] is the loss of token t given the tokens before it in its window (t = 0 has none)."""
    E = _example()
    train, held, vocab = E.split(_tiny_passages(), "violence", 1.0, seed=0)
    torch.manual_seed(0)
    model = E.CharGRU(vocab).eval()
    z, nats = E.latents_and_nats(model, train, window=16)
    ids = train.ids
    assert torch.isnan(nats[0]) and z.shape == (len(ids) - 1, 32)
    for t in (1, 5, 16, 17, 40):  # inside the first window, its last token, the second window's first tokens
        a = ((t - 1) // 16) * 16  # the window that predicts token t starts here
        with torch.no_grad():
            logits = model(ids[None, a:t])[0, -1]
        assert nats[t].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, ids[t]).item(), abs=1e-5)


def test_concept_marks_stay_inside_their_passage_and_retain_is_whole_passages_without_a_hit():
    E = _example()
    passages = ["He stabs him.", "A fair morning in the garden."]
    s = E.encode(passages, {ch: 1 for ch in "".join(passages)}, "violence", labelled={0}, after=20)
    first = len(passages[0]) + 2
    # "stabs" plus the 20 characters after it would run past the passage: the mark stops at its end
    assert s.concept[:first].tolist() == [False] * 3 + [True] * (len(passages[0]) - 3) + [False, False]
    assert not bool(s.concept[first:].any()) and bool(s.labels[:first].eq(s.concept[:first]).all())
    concept, retain = E.position_classes(s, len(s.ids))
    assert retain.tolist() == [False] * first + [True] * (len(s.ids) - first)  # "He " is neither concept nor retain
    assert concept.tolist() == s.concept.tolist()


def test_the_post_hoc_direction_is_fit_on_the_sparse_training_labels(monkeypatch):
    """The baseline sees what the anchored arm saw (the 30% labelled), not every labeller hit."""
    E = _example()
    seen, fit = {}, E.mean_difference

    def spy(acts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen["labels"] = labels.clone()
        return fit(acts, labels)

    monkeypatch.setattr(E, "mean_difference", spy)
    passages = _tiny_passages()
    E.run(passages, steps=1, coverage=0.3)
    train, _, _ = E.split(passages, "violence", 0.3, seed=0)
    n = len(seen["labels"])
    assert seen["labels"].tolist() == (train.labels[:n] > 0).tolist()
    assert int(train.concept[:n].sum()) > int(seen["labels"].sum()) > 0


def test_the_push_out_of_the_axis_spares_the_labelled_positions():
    """With every position labelled and the pull weighted 0, the anti-subspace term has nothing to push
    and the anchored arm trains into the control; with no position labelled it pushes everywhere."""
    E = _example()
    train, _, vocab = E.split(_tiny_passages(), "violence", 1.0, seed=0)

    def trained(labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = E.CharGRU(vocab)
        stream = train if labels is None else E.Text(train.ids, train.concept, labels, train.passage)
        E.train(model, stream, anchored=labels is not None, steps=4, seed=0, anchor_weight=0.0, batch=4, window=16)
        return model.state_dict()

    control = trained(None)
    every = trained(torch.ones_like(train.labels))
    none = trained(torch.zeros_like(train.labels))
    assert all(torch.equal(every[k], control[k]) for k in control)
    assert not all(torch.equal(none[k], control[k]) for k in control)
