"""Trained models, real edits: red must break, cyan must not (where theory says so)."""

import html
import json

import pytest
import torch
from typer.testing import CliRunner

from anchoring import load_run
from anchoring.cli import app
from anchoring.kinds.colour.control import relearn

runner = CliRunner()
pytestmark = pytest.mark.slow


def named_after(summary, edit):
    return {k: torch.tensor(v) for k, v in summary["interventions"][edit]["named_after"].items()}


def test_anchored_suppression_is_selective_and_ablation_is_not(anchored_run):
    out, _ = anchored_run
    summary = json.loads((out / "summary.json").read_text())
    sup = named_after(summary, "suppress-red")
    assert sup["red"].median() >= 0.15, sup["red"]
    for c in ("cyan", "lime", "purple", "grey", "white"):
        assert sup[c].median() <= 0.01, (c, sup[c])
    assert summary["interventions"]["suppress-red"]["selectivity_median"] >= 0.8
    abl = named_after(summary, "ablate-red")
    assert abl["red"].median() >= 0.2 and abl["cyan"].median() >= 0.2  # shared axis: both break (expected)
    assert "reason the isolated model" in (out / "report.html").read_text()
    grid = summary["interventions"]["suppress-red"]["grid_mse"]
    for space in ("hsv", "rgb"):  # dense grids: the edit costs something on average, but far less than on red
        before, after = torch.tensor(grid[f"{space}_grid_before"]), torch.tensor(grid[f"{space}_grid_after"])
        assert (after > before).all() and (after < sup["red"] / 3).all()


def test_isolated_ablation_deletes_red_alone(isolated_run):
    """Per seed, red is hit an order of magnitude harder than the colours far from it. The bar on the
    others' *medians* (≤ 0.005 over 16 seeds) is the slow test's; single seeds scatter more: over 384
    seeds of the shipped setting, 8 had cyan above 0.01 and 27 grey (docs/deletion.md), seed 0's grey
    is 0.026 and its cyan 0.011, so the absolute cap here is 0.03."""
    out, _ = isolated_run
    summary = json.loads((out / "summary.json").read_text())
    abl = named_after(summary, "ablate-red")
    assert abl["red"].mean() >= 0.2, abl["red"]
    for c in ("cyan", "purple", "grey", "white"):
        assert (abl["red"] >= 10 * abl[c].clamp_min(1e-3)).all(), (c, abl["red"], abl[c])  # per seed
        assert abl[c].max() <= 0.03, (c, abl[c])
    assert summary["interventions"]["ablate-red"]["selectivity_median"] >= 0.7


def test_intervene_and_delete_commands(anchored_run, tmp_path):
    out, _ = anchored_run
    r = runner.invoke(app, ["intervene", str(out), "--concept", "red", "--method", "repel", "--falloff", "power:0.1,2,1", "--name", "rp"])
    assert r.exit_code == 0, r.stderr
    assert "red" in r.stdout and "selectivity R² (k = 2) per seed" in r.stdout  # which k: one edit scores differently at another
    for f in ("colours.csv", "per_seed.csv", "hue_error.png", "reconstruction.png", "lobes.png", "strength.png"):
        assert (out / "interventions" / "rp" / f).is_file(), f
    shown = runner.invoke(app, ["show", str(out / "interventions" / "rp")])  # read back: the lines intervene printed
    selectivity = next(x for x in r.stdout.splitlines() if x.startswith("selectivity R² (k = 2) per seed"))
    assert shown.exit_code == 0 and selectivity in shown.stdout and "figures: hue_error.png" in shown.stdout, shown.stderr
    pruned = tmp_path / "pruned"
    r = runner.invoke(app, ["delete", str(out), "--concept", "red", "--method", "prune", "--out", str(pruned)])
    assert r.exit_code == 0, r.stderr
    ablated = tmp_path / "ablated"
    assert runner.invoke(app, ["delete", str(out), "--dims", "0", "--method", "ablate", "--out", str(ablated)]).exit_code == 0
    p, a, orig = load_run(pruned), load_run(ablated), load_run(out)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(0))
    assert p.encode(x).shape == (3, 64, 3)
    assert (p.reconstruct(x) - a.reconstruct(x)).abs().max() < 1e-6  # the two deletions agree
    red = torch.tensor([[1.0, 0.0, 0.0]])
    assert (p.reconstruct(red) - red).pow(2).mean(-1).min() > 0.1 > (orig.reconstruct(red) - red).pow(2).mean(-1).max()
    # bad input: one line, nothing written
    for args, msg in ((["delete", str(out), "--concept", "blue", "--out", str(tmp_path / "x")], "no concept 'blue'"),
                      (["delete", str(out), "--dims", "9", "--out", str(tmp_path / "x")], "within 0..3"),
                      (["intervene", str(out), "--concept", "red", "--falloff", "wobbly"], "unknown falloff"),
                      (["intervene", str(out)], "give --concept")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "x").exists()
    assert json.loads((pruned / "edit.json").read_text())["k"] == 2.0  # the deleted run says how it was scored
    # a --dims edit of a concept is another edit: its default folder is not the concept's own edit's
    for extra in ([], ["--dims", "3"]):
        r = runner.invoke(app, ["intervene", str(out), "--concept", "red", "--method", "ablate", *extra])
        assert r.exit_code == 0, r.stderr
    assert {"ablate-red-constant", "ablate-red-dims3-constant"} <= {p.name for p in (out / "interventions").iterdir()}


def test_relearning_curves_are_recorded_and_more_samples_help(anchored_run):
    out, _ = anchored_run
    res = relearn(load_run(out), "red", [1, 64], steps=40, lr=0.01, baseline=False)
    res.path = res.files[0]
    res.rows = res.summary["rows"]
    curves = (res.path / "curves.csv").read_text().splitlines()
    assert len(curves) == 1 + 2 * 3 * 41  # header + K × seeds × (steps + 1)
    rows = {r["K"]: r for r in res.rows}
    assert rows[1]["start_error"] > 0.1  # deletion really removed red before the attack
    import csv

    data = list(csv.DictReader(open(res.path / "curves.csv")))
    mean = {k: sum(float(d["error"]) for d in data if int(d["K"]) == k) / sum(1 for d in data if int(d["K"]) == k) for k in (1, 64)}
    assert mean[64] < mean[1], mean  # on average, more concept samples relearn it faster
    assert (res.path / "relearn.png").is_file()


def test_relearning_attack_on_the_post_hoc_baseline(anchored_run):
    """The baseline path: an unanchored run of the same config, its difference-of-means direction
    projected out of the weights, attacked the same way."""
    out, _ = anchored_run
    res = relearn(load_run(out), "red", [16], steps=20, lr=0.01, baseline=True)
    rows = {r["model"]: r for r in res.summary["rows"]}
    assert set(rows) == {"anchored", "post-hoc"}
    base = res.files[0] / "baseline-run"
    assert (base / "summary.json").is_file()
    assert load_run(base).config.terms == [] and load_run(base).seeds == load_run(out).seeds
    # what a resume reads back is what it trained under: a None concept used to drop out of config.toml
    # and come back as the default "red", with "cos(None, anchor)" in the summary before it
    assert load_run(base).config.evaluate.concept == ""
    # its page describes the baseline, not the anchored experiment it was copied from
    page = html.unescape((base / "report.html").read_text())
    assert "the relearning attack's baseline" in page.lower() and "× marks the anchor" not in page
    assert load_run(out).config.description.split(".")[0] not in page
    assert "None" not in json.loads((base / "summary.json").read_text())["criterion"]
    assert rows["post-hoc"]["start_error"] > 0.02  # the post-hoc edit did damage red before the attack
    import csv

    data = list(csv.DictReader(open(res.files[0] / "curves.csv")))
    assert {d["model"] for d in data} == {"anchored", "post-hoc"} and len(data) == 2 * 3 * 21


def test_the_relearning_median_never_averages_a_seed_that_did_not_recover():
    from anchoring.kinds.colour.control import median_steps

    assert median_steps([8, None], 10) == ">10"  # was 9.5: (8 + 11) / 2
    assert median_steps([8, 4], 10) == "6" and median_steps([8, 4, None], 10) == "8"
    assert median_steps([None, None], 10) == ">10"


def test_a_seed_the_deletion_left_under_the_threshold_is_marked_and_kept_out_of_the_median():
    from rich.console import Console

    from anchoring.kinds.colour.control import attack_table

    summary = {"concept": "red", "steps": 30, "threshold": 0.01,
               "rows": [{"model": "post-hoc", "K": 1, "start_error": 0.2, "steps_to_recover": [0, 12, 20],
                         "start_errors": [0.0013, 0.3, 0.2]},
                        {"model": "anchored", "K": 1, "start_error": 0.005, "steps_to_recover": [0],
                         "start_errors": [0.005]}]}
    con = Console(width=250, record=True)
    con.print(attack_table(summary))
    text = con.export_text()
    (first,) = [line for line in text.splitlines() if "post-hoc" in line]
    assert "nd 12 20" in first and " 16 " in first  # the median of 12 and 20, not of 0, 12, 20
    (second,) = [line for line in text.splitlines() if "anchored" in line]
    assert second.count("nd") == 2  # no seed was deleted: no median either
