"""Deletion analysis (where an ablated concept lands), seed selection, and the residual-toward term."""

import math

import pytest
import torch
from torch import nn

from anchoring.anchor import build_term
from anchoring.anchor import regularizers as R
from anchoring.anchor.terms import Concept
from anchoring.domains.colour import NAMES, get_labeller, named_rgb
from anchoring.errors import AnchoringError
from anchoring.evaluate.selection import edit_summary, pareto_selection
from anchoring.kinds.colour.deletion import (
    ablated_latent,
    cosines,
    deletion_landing,
    landing_rows,
    nearest,
    nearest_on_grid,
    residual_direction,
    residual_norm,
)
from anchoring.models import ColourAutoencoder


def test_residual_direction_is_what_the_ablated_model_computes():
    torch.manual_seed(3)
    model = ColourAutoencoder(latent_dim=5, hidden=(10, 10))
    x = torch.rand(64, 3)
    with torch.no_grad():
        z = model.encode(x)
    for dims in ([0], [1, 3]):
        assert torch.allclose(residual_direction(z, dims), ablated_latent(model, x, dims), atol=1e-6)


def test_residual_of_a_hand_built_latent():
    z = torch.tensor([[0.99, 0.0, 0.141, 0.0]])  # nearly on dim 0, a small tilt towards dim 2
    r = residual_direction(z, [0])
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), atol=1e-6)  # tiny tilt → a full unit vector
    assert math.isclose(float(residual_norm(z, [0])), 0.141 / float(z.norm()), rel_tol=1e-5)
    assert torch.equal(residual_direction(torch.tensor([[2.0, 0.0, 0.0]]), [0]), torch.zeros(1, 3))  # no residual: no NaN


def test_cosines_and_nearest():
    refs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    cos = cosines(torch.tensor([[0.0, 1.0], [1.0, 0.1]]), refs)
    assert cos.shape == (2, 3)
    assert torch.allclose(cos[0], torch.tensor([0.0, 1.0, -1 / math.sqrt(2)]), atol=1e-6)
    top = nearest(cos, ["a", "b", "c"], k=2)
    assert [n for n, _ in top[0]] == ["b", "a"] and [n for n, _ in top[1]] == ["a", "b"]


class Table(nn.Module):
    """A hand-built 'autoencoder' with known latents: colour j → one-hot-ish latent, decoder = lookup.

    Encoder: Linear(3 → 3) then L2 norm; red's latent is (0.98, 0.2, 0); after ablating dim 0
    its residual is exactly dim 1, which the decoder maps to whatever we put in its column 1.
    """

    def __init__(self, residual_colour: torch.Tensor) -> None:
        super().__init__()
        from anchoring.models.colour_ae import L2Normalize

        self.encoder = nn.Sequential(nn.Linear(3, 3))
        self.latent = L2Normalize()
        self.decoder = nn.Sequential(nn.Linear(3, 3))
        with torch.no_grad():
            # rgb → latent: red (1,0,0) → (0.98, 0.2, 0); green (0,1,0) → dim 1; blue → dim 2
            self.encoder[0].weight.copy_(torch.tensor([[0.98, 0.0, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0]]))
            self.encoder[0].bias.zero_()
            # latent dim 0 → red, dim 1 → residual_colour, dim 2 → blue
            cols = torch.stack([torch.tensor([1.0, 0.0, 0.0]), residual_colour, torch.tensor([0.0, 0.0, 1.0])], 1)
            self.decoder[0].weight.copy_(cols)
            self.decoder[0].bias.zero_()

    def encode(self, x):
        return self.latent(self.encoder(x))

    def forward(self, x):
        return self.decoder(self.encode(x))


def test_landing_on_a_hand_built_model():
    grey = torch.tensor([0.5, 0.5, 0.5])
    dark_red = torch.tensor([0.5, 0.0, 0.0])
    land = deletion_landing([Table(grey), Table(dark_red)], [0], k=2)
    # residual is dim 1 in both; dim 1 is where green lives, so green is red's nearest named colour after the edit
    assert torch.allclose(land["after"], torch.tensor([[0.0, 1.0, 0.0]] * 2), atol=1e-6)
    assert land["nearest"][0][0][0] == "green" and land["nearest"][1][0][0] == "green"
    assert land["nearest_before"][0][0][0] == "red"
    # what it decodes to is the decoder's column 1 (unit residual × column)
    assert torch.allclose(land["decoded"], torch.stack([grey, dark_red]), atol=1e-6)
    assert torch.allclose(land["error"], torch.tensor([0.25, 0.25 / 3]), atol=1e-6)
    assert NAMES[int(land["decoded_nearest"][0])] == "grey"
    assert land["cos_after"].shape == (2, len(NAMES)) and "cos_grey_centre" in land
    rows = landing_rows(land, [7, 8])
    assert rows[0]["seed"] == 7 and rows[1]["decoded_as"] in NAMES and rows[0]["nearest"][0][0] == "green"
    grid = nearest_on_grid([Table(grey)], land["after"][:1], named_rgb())
    assert torch.allclose(grid["rgb"][0], torch.tensor([0.0, 1.0, 0.0])) and float(grid["cos"][0]) > 0.999


def test_pareto_selection_on_a_known_front():
    rows = [
        {"seed": 10, "val_mse": 1.0, "val_anchor_loss": 1.0},  # dominated by 11 (worse on everything)
        {"seed": 11, "val_mse": 0.5, "val_anchor_loss": 0.5},  # front
        {"seed": 12, "val_mse": 0.1, "val_anchor_loss": 2.0},  # front: best reconstruction
        {"seed": 13, "val_mse": 2.0, "val_anchor_loss": 2.0},  # front: best selectivity only
        {"seed": 14, "val_mse": 0.5, "val_anchor_loss": 0.5},  # same as 11 but less selective: dominated
    ]
    sel = [0.5, 0.8, 0.1, 0.95, 0.7]
    assert pareto_selection(rows, sel) == [11, 12, 13]
    no_anchor = [{"seed": r["seed"], "val_mse": r["val_mse"]} for r in rows]
    assert pareto_selection(no_anchor, sel) == [11, 12, 13]
    assert pareto_selection([], []) == []
    with pytest.raises(ValueError):
        pareto_selection(rows, sel[:2])


def test_edit_summary_medians_all_vs_selected():
    named = {"red": [0.1, 0.3, 0.4, 0.5], "cyan": [0.0, 0.01, 0.02, 0.0]}
    rows = edit_summary(named, seeds=[1, 2, 3, 4], selected=[2, 4], selectivity=[0.9, 0.8, 0.7, 0.6])
    red, cyan, sel = rows
    assert red["colour"] == "red" and math.isclose(red["all"], 0.35) and math.isclose(red["selected"], 0.4)
    assert math.isclose(cyan["all"], 0.005) and math.isclose(cyan["selected"], 0.005)
    assert sel["colour"] == "selectivity" and math.isclose(sel["selected"], 0.7) and sel["n_selected"] == 2
    with pytest.raises(ValueError):
        edit_summary(named, seeds=[1, 2, 3, 4], selected=[9])


def test_residual_toward_pulls_only_labelled_residuals_towards_the_reference_centre():
    red = Concept("red", get_labeller("red"), anchor=(1.0, 0.0, 0.0))
    grey = Concept("grey", get_labeller("desaturated"))
    term = build_term("residual-toward", "residual", latent_dim=3, concept=red, toward=grey, dims=[0])
    z = torch.tensor([[0.9, 0.0, 0.1], [0.0, 1.0, 0.0], [0.0, 0.8, 0.0]], requires_grad=True)
    labels = {"red": torch.tensor([1.0, 0.0, 0.0]), "grey": torch.tensor([0.0, 1.0, 1.0])}
    loss = term({"latent": z}, labels)
    assert math.isclose(float(loss.detach()), 1.0, abs_tol=1e-6)  # residual (0,0,1) ⟂ centre (0,1,0)
    loss.backward()
    assert z.grad[1:].abs().max() == 0  # the reference (greys) is not moved
    assert z.grad[0, 1] < 0  # gradient descent moves red's residual towards dim 1
    aligned = torch.tensor([[0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.8, 0.0]])
    assert float(term({"latent": aligned}, labels)) < 1e-6
    none = {"red": labels["red"], "grey": torch.zeros(3)}
    zz = z.detach().clone().requires_grad_(True)
    term({"latent": zz}, none).backward()
    assert zz.grad.abs().max() == 0  # no reference in the batch: no pull
    with pytest.raises(AnchoringError):
        build_term("residual-toward", "residual", latent_dim=3, concept=red, dims=[0])
    with pytest.raises(AnchoringError):
        build_term("anchor", "anchor", latent_dim=3, concept=red, toward=grey)
    assert torch.allclose(R.residual_toward(torch.tensor([[0.5, 0.0, 2.0]]), [0], torch.tensor([0.0, 0.0, 3.0])), torch.zeros(1))


def test_landing_figures_draw(tmp_path):
    from anchoring.kinds.colour.deletion_figures import landing_cosines, landing_plane
    from anchoring.report import figures

    torch.manual_seed(0)
    models = [ColourAutoencoder(latent_dim=5, hidden=(10, 10)) for _ in range(3)]
    land = deletion_landing(models, [0])
    figures.save(landing_cosines(land, [1, 2, 3]), tmp_path / "cos.png")
    figures.save(landing_plane(land, [1, 2, 3]), tmp_path / "plane.png")
    assert (tmp_path / "cos.png").stat().st_size > 0 and (tmp_path / "plane.png").stat().st_size > 0


def test_select_pareto_from_the_command_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from anchoring.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "anchored", "--seeds", "4", "--steps", "150", "--select", "pareto", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["selection"]["seeds"]
    assert chosen and set(chosen) <= {0, 1, 2, 3} and summary["select"] == "pareto"
    rows = {row["colour"]: row for row in summary["selection"]["edits"]["ablate-red"]}
    assert rows["red"]["n_all"] == 4 and rows["red"]["n_selected"] == len(chosen)
    assert f"Pareto-selected seeds {chosen}" in r.stdout
    plain = CliRunner().invoke(app, ["show", str(out), "--select", "all"])
    assert plain.exit_code == 0 and "Pareto-selected" not in plain.stdout
    again = CliRunner().invoke(app, ["show", str(out), "--select", "pareto"])
    assert again.exit_code == 0 and f"Pareto-selected seeds {chosen}" in again.stdout


def test_landing_figures_by_hand_residual_norm_clamped_error_grey_centre_and_rounding():
    from anchoring.domains.colour import GREY_NAMES
    from anchoring.kinds.colour.deletion_figures import landing_cosines, landing_plane

    assert float(residual_norm(torch.tensor([3.0, 4.0]), [0])) == pytest.approx(0.8)  # a share of the length
    bright = torch.tensor([1.5, 0.0, 0.0])  # the residual decodes past the top of the cube
    land = deletion_landing([Table(bright), Table(torch.tensor([0.5, 0.5, 0.5]))], [0], k=2)
    assert float(land["error"][0]) == pytest.approx(0.0, abs=1e-6)  # clamped to 1 before it is scored against red
    torch.manual_seed(3)
    ae = ColourAutoencoder(latent_dim=5, hidden=(10, 10))  # greys spread unevenly: their mean is not their median
    grey = [NAMES.index(g) for g in GREY_NAMES]
    got = deletion_landing([ae], [0])
    centre = torch.nn.functional.normalize(got["reference_latents"][:, grey].mean(1), dim=-1)
    assert len(grey) >= 3 and torch.allclose(got["cos_grey_centre"], cosines(got["after"], centre.unsqueeze(1))[:, 0])
    land["nearest"] = [[("green", 0.123456)], [("grey", 0.5)]]
    assert landing_rows(land, [0, 1])[0]["nearest"] == [["green", 0.1235]]
    land["error"] = torch.tensor([0.123, 0.25])
    fig = landing_cosines(land, [0, 1])
    ax = fig.axes[0]
    assert list(ax.images[0].get_extent()) == [0, len(NAMES), 2, 0]  # seed 0 on top, beside its tick label
    assert {"0.12", "0.25"} <= {t.get_text() for t in ax.texts}
    land["after"] = torch.tensor([[0.1, 0.9, -0.5], [0.0, 0.0, 1.0]])
    assert "x dim 1, y dim 2" in landing_plane(land, [0, 1]).axes[0].get_title()
