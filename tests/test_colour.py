import colorsys
import math

import pytest
import torch

from anchoring.domains.colour import (
    GREY_NAMES,
    HUE_NAMES,
    NAMES,
    get_labeller,
    hsv_grid,
    hsv_similarity,
    hsv_to_rgb,
    hsv_weights,
    named_colours,
    rgb_grid,
    rgb_to_hsv,
)
from anchoring.errors import AnchoringError


@pytest.mark.parametrize("rgb,hsv", [
    ((1, 0, 0), (0, 1, 1)), ((0, 1, 0), (1 / 3, 1, 1)), ((0, 0, 1), (2 / 3, 1, 1)),
    ((0, 1, 1), (0.5, 1, 1)), ((1, 1, 1), (0, 0, 1)), ((0, 0, 0), (0, 0, 0)),
    ((0.5, 0.25, 0.25), (0, 0.5, 0.5)), ((1, 0, 1), (5 / 6, 1, 1)),
])
def test_known_values(rgb, hsv):
    got = rgb_to_hsv(torch.tensor(rgb, dtype=torch.float32))
    assert torch.allclose(got, torch.tensor(hsv, dtype=torch.float32), atol=1e-6)
    back = hsv_to_rgb(torch.tensor(hsv, dtype=torch.float32))
    assert torch.allclose(back, torch.tensor(rgb, dtype=torch.float32), atol=1e-6)


def test_matches_colorsys_and_round_trips():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(500, 3, generator=g)
    hsv = rgb_to_hsv(rgb)
    ref = torch.tensor([colorsys.rgb_to_hsv(*map(float, c)) for c in rgb])
    assert torch.allclose(hsv, ref, atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)
    # batch dims are free
    assert rgb_to_hsv(rgb.reshape(5, 100, 3)).shape == (5, 100, 3)


def test_grids():
    g = rgb_grid(8)
    assert g.shape == (512, 3)
    assert len(torch.unique(g, dim=0)) == 512
    assert {tuple(c) for c in g.tolist()} >= {(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)}
    rgb, hsv = hsv_grid(36, 10, 10)
    assert rgb.shape == hsv.shape == (3600, 3)
    assert torch.allclose(rgb_to_hsv(rgb)[hsv[:, 1] * hsv[:, 2] > 0.05][:, 1:], hsv[hsv[:, 1] * hsv[:, 2] > 0.05][:, 1:], atol=1e-5)
    w = hsv_weights(hsv)
    black = hsv[:, 2] == 0
    assert w[black].max() < w[~black].mean()  # the 360 copies of black are sampled rarely
    with pytest.raises(ValueError):
        rgb_grid(1)


def test_named_colours():
    named = named_colours()
    assert list(named) == list(NAMES) and len(NAMES) == 17
    assert len(HUE_NAMES) == 12 and len(GREY_NAMES) == 5
    assert named["red"].tolist() == [1, 0, 0]
    assert torch.allclose(named["cyan"], torch.tensor([0.0, 1, 1]))
    assert torch.allclose(named["orange"], torch.tensor([1.0, 0.5, 0]))
    assert torch.allclose(named["grey"], torch.tensor([0.5, 0.5, 0.5]))
    hues = rgb_to_hsv(torch.stack([named[n] for n in HUE_NAMES]))[:, 0]
    assert torch.allclose(hues, torch.arange(12) / 12.0, atol=1e-6)


def test_label_probabilities_follow_the_formulas():
    red, vib, des = get_labeller("red"), get_labeller("vibrant"), get_labeller("desaturated")
    x = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0.5, 0.5, 0.5], [0.9, 0.2, 0.4]])
    r, g, b = x.unbind(-1)
    assert torch.allclose(red.probability(x), 0.08 * (r * (1 - g / 2 - b / 2)) ** 8)
    assert math.isclose(float(red.probability(x[0])), 0.08, rel_tol=1e-6)
    hsv = rgb_to_hsv(x)
    sv = hsv[:, 1] * hsv[:, 2]
    assert torch.allclose(vib.probability(x), 0.01 * sv**10)
    assert torch.allclose(des.probability(x), 0.5 * (1 - sv) ** 10)
    assert float(vib.probability(x[2])) == 0.0 and math.isclose(float(des.probability(x[2])), 0.5)
    assert red.exact(x).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(AnchoringError, match="unknown labeller 'blue'"):
        get_labeller("blue")


def test_labels_are_redrawn_bernoulli_and_sparse():
    from anchoring import experiments
    from anchoring.kinds.colour.training import ColourTask

    # the draws training itself makes: every time pure red is sampled, it is labelled ~8% of the time
    task = ColourTask(experiments.load("anchored", ["train.seeds=4", "data.batch_size=4096"]))
    hits = draws = 0
    for step in range(40):
        x, labels = task.batch(step)
        pure = (x == torch.tensor([1.0, 0.0, 0.0])).all(-1)
        hits += labels["red"][pure].sum().item()
        draws += pure.sum().item()
        assert labels["red"][x[..., 0] == 0].sum() == 0  # never where red has no weight (r = 0)
    assert draws > 1000 and abs(hits / draws - 0.08) < 0.02
    again, _ = task.batch(7)
    assert torch.equal(again, task.batch(7)[0])  # a pure function of (seed, step)
    # redrawn at every step: each label is this step's own uniform against the point's probability, and the
    # uniforms differ from step to step (a fixed draw passed the rate check above)
    for step in (3, 4):
        u = task.stream(step)
        idx = task.sampler.indices(u[..., 0])
        assert torch.equal(task.batch(step)[1]["red"], (u[..., 1] < task.probs[0][idx]).float())
    assert not torch.equal(task.stream(3)[..., 1], task.stream(4)[..., 1])
    grid = rgb_grid(8)
    overall = sum(get_labeller(n).probability(grid).mean().item() for n in ("red", "vibrant"))
    assert overall < 0.005  # ~0.1% of samples carry a label


def test_similarity():
    n = named_colours()
    s = lambda a, b: float(hsv_similarity(n[a], n[b]))  # noqa: E731
    assert s("red", "red") == pytest.approx(1.0)
    assert s("red", "cyan") == pytest.approx(0.0, abs=1e-6)
    assert s("red", "orange") == pytest.approx(2 / 3, abs=1e-5)
    assert s("red", "orange") > s("red", "yellow") > s("red", "green")
    # greys: hue does not matter, only value
    assert s("grey", "white") == pytest.approx(0.5)
    assert s("red", "white") == pytest.approx(s("white", "red"))


def test_a_controller_on_the_curriculum_extent_changes_what_is_drawn(monkeypatch):
    """The batch read the extent from the table cached at start-up, so a re-targeted extent changed
    the logged value but not the points drawn."""
    from anchoring import experiments
    from anchoring.kinds.colour.config import ReactiveConfig
    from anchoring.kinds.colour.training import ColourTask

    base = experiments.load("smooth-curriculum", ["train.seeds=1"])
    cfg = base.model_copy(update={"reactive": [ReactiveConfig(param="extent", metric="loss", target=1.0)]})
    task = ColourTask(cfg)
    step = 5
    before = task.timeline.tracks["extent"](step)
    seen = []
    real = task.sampler.set_weights
    monkeypatch.setattr(task.sampler, "set_weights", lambda w: seen.append(w.clone()) or real(w))
    task.batch(step)
    task.timeline.retarget("extent", step, min(1.0, before + 0.5), step + 1)
    task.batch(step + 1)
    assert task.last_extent == task.timeline.tracks["extent"](step + 1) != before
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # the sampler's weights follow the new extent


def test_exact_labels_need_the_score_to_reach_the_threshold():
    from anchoring.domains.colour import LABELLERS
    from anchoring.domains.colour.labels import Labeller

    at = Labeller("t", lambda x: x[..., 0], 1.0, 1.0)
    assert at.threshold == 0.5 and at.exact(torch.tensor([[0.5, 0.0, 0.0]])).tolist() == [1.0]  # at the threshold: labelled
    red = get_labeller("red")
    assert red.exact(torch.tensor([[0.9, 0.0, 0.0]])).tolist() == [0.0]  # 0.9⁸ ≈ 0.43 < 0.5
    assert float(LABELLERS["saturated"].probability(torch.tensor([[1.0, 0.5, 0.5]]))) == pytest.approx(0.5**20)
