import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from anchoring import load_run
from anchoring.cli import app
from anchoring.domains.colour import HUE_NAMES, named_colours, rgb_to_hsv
from anchoring.kinds.colour.structure import (
    hue_order_agreement,
    nearest_neighbour_spread,
    plane_fraction,
    structure_score,
)

runner = CliRunner()


def wheel_encoder(tilt: float = 0.0, shuffle: bool = False):
    """A hand-made 'model': hue angle on dims 0-1, optionally tilted out of the plane into dim 2."""
    def encode(rgb):
        h = rgb_to_hsv(rgb)[..., 0]
        if shuffle:
            h = (h * 7.0) % 1.0  # scrambles the order of the 12 named hues
        a = h * 2 * math.pi
        z = torch.stack([torch.cos(a), torch.sin(a), torch.full_like(a, tilt), torch.zeros_like(a)], -1)
        return (z / z.norm(dim=-1, keepdim=True)).unsqueeze(0)
    return encode


def test_structure_score_on_constructed_latents():
    red = torch.tensor([1.0, 0, 0])
    anchor = torch.tensor([1.0, 0, 0, 0])
    good = structure_score(wheel_encoder(), (0, 1), anchor, red)[0]
    assert good["hue_order"] == 1.0 and good["vibrant_in_plane"] == pytest.approx(1.0)
    assert good["anchor_angle_deg"] == pytest.approx(0.0, abs=0.1)
    tilted = structure_score(wheel_encoder(tilt=1.0), (0, 1), anchor, red)[0]
    assert tilted["vibrant_in_plane"] == pytest.approx(0.5, abs=1e-5)
    assert tilted["anchor_angle_deg"] == pytest.approx(45.0, abs=0.1)
    scrambled = structure_score(wheel_encoder(shuffle=True), (0, 1))[0]
    assert scrambled["hue_order"] < 1.0 and "anchor_angle_deg" not in scrambled


def test_spread_and_plane_fraction():
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert nearest_neighbour_spread(pts).item() == pytest.approx(90.0, abs=1e-3)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1e-3]])
    assert nearest_neighbour_spread(collapsed).item() < 0.1
    assert plane_fraction(torch.tensor([[[1.0, 0.0, 1.0]]]), (0, 1)).item() == pytest.approx(0.5)
    assert hue_order_agreement(torch.randn(12, 2, generator=torch.Generator().manual_seed(0))[None], (0, 1)).item() < 1.0


def test_colour_wheel_forms_with_no_regularizer(tmp_path):
    out = tmp_path / "wheel"
    r = runner.invoke(app, ["run", "ex-1.2", "--seeds", "2", "--steps", "600", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    run = load_run(out)
    named = named_colours()
    z = run.encode(torch.stack([named[n] for n in HUE_NAMES]))  # (2, 12, 2)
    angles = torch.atan2(z[..., 1], z[..., 0])
    steps = torch.remainder(torch.roll(angles, -1, dims=1) - angles + math.pi, 2 * math.pi) - math.pi
    assert all((s > 0).all() or (s < 0).all() for s in steps), steps
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["structure"]["hue_order"] == 1.0 for s in summary["seeds"])
    assert all(s["val_mse"] < 0.01 for s in summary["seeds"])  # validated on the hues it trained on
    gif = Image.open(out / "figures" / "evolution.gif")
    snapshots = 1 + 600 // 100  # step 0 and every 100 steps
    assert gif.n_frames == snapshots
    assert (out / "figures" / "phase_history.png").is_file()
    assert "image/gif" in (out / "report.html").read_text()


@pytest.mark.parametrize("name,expect", [("ex-1.1", {"rgb_cube.png", "hsv_wheel.png", "hsv_cylinder.png"}),
                                         ("ex-1.4", {"timing_functions.png", "retargeting.png"})])
def test_figure_only_experiments(tmp_path, name, expect):
    out = tmp_path / name
    r = runner.invoke(app, ["run", name, "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert {p.name for p in (out / "figures").iterdir()} == expect
    assert all((out / "figures" / f).stat().st_size > 10_000 for f in expect)


def test_curriculum_depth_and_weights():
    from anchoring.domains.colour.curriculum import curriculum_depth, curriculum_weights

    named = named_colours()
    rgb = torch.stack([named[n] for n in ("red", "yellow", "orange", "grey", "white")] +
                      [torch.tensor([0.5, 0.0, 0.0]), torch.tensor([1.0, 0.5, 0.5])])
    assert curriculum_depth(rgb).tolist() == [0.0, 0.0, 0.25, 1.0, 0.75, 0.5, 0.75]
    d = curriculum_depth(rgb)
    assert curriculum_weights(d, 0.0).tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert curriculum_weights(d, 0.125)[2].item() == pytest.approx(0.5)  # the next band fades in
    assert (curriculum_weights(d, 1.0) == 1).all()


def test_curriculum_changes_the_data_the_sampler_draws():
    from anchoring import experiments
    from anchoring.domains.colour.curriculum import curriculum_depth
    from anchoring.kinds.colour import training as loop

    cfg = experiments.load("curriculum", ["train.seeds=1", "train.steps=60", "train.snapshot_every=0"])
    seen = []
    real = loop.WeightedPoints.indices

    def spy(self, u):
        idx = real(self, u)
        seen.append(curriculum_depth(self.points[idx]).max().item())
        return idx

    loop.WeightedPoints.indices = spy
    try:
        loop.train(cfg)
    finally:
        loop.WeightedPoints.indices = real
    # stepped curriculum stretched to 60 steps: primaries only until the 'All hues' phase at step 10
    assert max(seen[:10]) == 0.0
    assert max(seen[-10:]) == 1.0


@pytest.mark.parametrize("name", ["curriculum", "smooth-curriculum", "sparse-labels"])
def test_m1_training_specs_run_end_to_end(tmp_path, name):
    out = tmp_path / name
    r = runner.invoke(app, ["run", name, "--seeds", "2", "--steps", "400", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["seeds"]) == 2 and all("structure" in s for s in summary["seeds"])
    # predicting the mean colour scores ~0.083 (the variance of a uniform channel); these must do far better
    assert all(s["val_mse"] < 0.01 for s in summary["seeds"]), [s["val_mse"] for s in summary["seeds"]]
    from safetensors import safe_open

    with safe_open(str(out / "snapshots.safetensors"), "pt") as f:
        snapshots = [k for k in f.keys() if k.startswith("step.")]
    assert len(snapshots) >= 2
    assert Image.open(out / "figures" / "evolution.gif").n_frames == len(snapshots)  # one frame per snapshot


def test_smooth_vs_stepped_trains_both_on_the_same_seeds(tmp_path):
    out = tmp_path / "svs"
    r = runner.invoke(app, ["run", "ex-1.6", "--seeds", "2", "--steps", "200", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    rows = {row["variant"]: row for row in json.loads((out / "summary.json").read_text())["comparison"]}
    assert set(rows) == {"smooth", "stepped"}
    for name in rows:
        assert load_run(out / "variants" / name).seeds == [0, 1]
    smooth = load_run(out / "variants" / "smooth").config.schedule
    stepped = load_run(out / "variants" / "stepped").config.schedule
    assert "extent:linear:step" in stepped and "extent:linear:step" not in smooth
    assert (out / "figures" / "compare_loss.png").is_file()
    assert "comparison" in r.stdout


def test_term_masks_switch_terms_per_member():
    from anchoring import experiments
    from anchoring.kinds.colour.training import train

    base = experiments.load("anchored", ["train.steps=30", "train.snapshot_every=0"])
    n_terms = len(base.terms)
    masks = [[True] * n_terms, [False] * n_terms]
    cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed_list": [3, 3], "term_masks": masks})})
    res = train(cfg)
    loss, recon = res.metrics[..., 0], res.metrics[..., 1]
    assert torch.equal(loss[:, 1], recon[:, 1])  # member 1: no terms at all
    assert (loss[:, 0] > recon[:, 0]).any()  # member 0: terms add to its loss
    assert torch.equal(res.metrics[0, 0, 1], res.metrics[0, 1, 1])  # same seed: identical first step


def test_regularizer_combinations_covers_every_subset(tmp_path):
    out = tmp_path / "combo"
    r = runner.invoke(app, ["run", "ex-1.8", "--steps", "60", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    rows = json.loads((out / "summary.json").read_text())["combinations"]
    assert len(rows) == 31 and len({row["terms"] for row in rows}) == 31
    assert rows[0]["n_terms"] == 5 and sum(row["n_terms"] == 1 for row in rows) == 5
    assert load_run(out / "ensemble").seeds == [0] * 31  # every subset on the same seed
    assert (out / "figures" / "combinations.png").stat().st_size > 10_000
