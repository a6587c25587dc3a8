"""Colour runs: a bad site is refused before anything is written; an intervention's folder is
written whole and holds only its own files."""

import os

import pytest
import torch
from typer.testing import CliRunner

from anchoring import experiments, lifecycle
from anchoring.cli import app
from anchoring.config import InterventionConfig
from anchoring.errors import AnchoringError
from anchoring.kinds.colour import control
from anchoring.kinds.colour.model import ColourRun
from anchoring.kinds.colour.objective import build_model

SHORT = ["train.seeds=1", "train.steps=20"]

BAD_SITES = [  # (override, what the one-line error must say)
    ('terms.0.site="nosuch"', "term 'separation': model has no module 'nosuch'"),
    ('terms.1.site="encoder.0"', "term 'anchor:red': site 'encoder.0' has width 16, but its direction has 4 entries"),
    ('interventions.0.site="encoder.0"', "intervention 'suppress-red': site 'encoder.0' has width 16, not the latent width 4"),
    ('interventions.0.site="nosuch"', "intervention 'suppress-red': model has no module 'nosuch'"),
    ('interventions.2.site="encoder"', "intervention 'ablate-red': cannot edit weights at 'encoder'"),
    # read only after training: an IndexError then, or hue numbers of one dim against itself, or no anchoring columns
    ("evaluate.hue_dims=[0,7]", "evaluate.hue_dims [0, 7] must be two different dims within 0..3"),
    ("evaluate.hue_dims=[1,1]", "evaluate.hue_dims [1, 1] must be two different dims"),
    ('evaluate.concept="blue"', "evaluate.concept 'blue' is not a concept of this experiment (red, vibrant)"),
]


@pytest.mark.parametrize("override,message", BAD_SITES)
def test_a_bad_site_is_refused_by_validate(override, message):
    cfg = experiments.load("anchored", [*SHORT, override])
    with pytest.raises(AnchoringError) as e:
        lifecycle.validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,message", BAD_SITES[:3])
def test_a_bad_site_exits_2_and_writes_no_folder(tmp_path, override, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "anchored", "--steps", "20", "--seeds", "1", "--out", str(out), "-q", "--set", override])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("override", [
    'terms.0.site="encoder.0"',  # separation reads any width
    'terms.2.site="decoder.0"',  # subspace dims 0, 1 lie inside a 16-wide site
    'terms.1.site="encoder"',  # the latent before normalisation: as wide as the latent
    'interventions.0.site="encoder"',
])
def test_sites_that_train_and_edit_still_validate(override):
    lifecycle.validate(experiments.load("anchored", [*SHORT, override]))


def test_validate_draws_nothing_from_the_global_generator():
    cfg = experiments.load("anchored", SHORT)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lifecycle.validate(cfg)
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture
def untrained_run(tmp_path):
    """A run of the default experiment with untrained models: enough to write interventions."""
    cfg = experiments.load("anchored", ["train.seeds=2"])
    torch.manual_seed(0)
    return ColourRun(tmp_path / "run", cfg, [0, 1], [build_model(cfg).eval() for _ in range(2)])


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_an_intervention_of_the_same_name_replaces_the_earlier_folder(untrained_run):
    run = untrained_run
    control.intervene(run, InterventionConfig(name="x", method="suppress", concept="red"))
    out = run.path / "interventions" / "x"
    assert {"lobes.png", "strength.png"} <= set(_files(out))
    res = control.intervene(run, InterventionConfig(name="x", method="zero", concept="red"))
    assert _files(out) == ["colours.csv", "hue_error.png", "per_seed.csv", "reconstruction.png", "spec.json"]
    assert '"zero"' in (out / "spec.json").read_text()
    assert all(f.is_file() for f in res.files)
    assert _files(out.parent) == ["x"]  # no staging or set-aside folder left beside it


def test_an_interrupted_intervention_leaves_the_earlier_folder_whole(untrained_run, monkeypatch):
    run = untrained_run
    control.intervene(run, InterventionConfig(name="x", method="suppress", concept="red"))
    out = run.path / "interventions" / "x"
    before = {n: (out / n).read_bytes() for n in _files(out)}

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(control.figures, "save", interrupted)  # Ctrl-C while the figures are written
    with pytest.raises(KeyboardInterrupt):
        control.intervene(run, InterventionConfig(name="x", method="zero", concept="red"))
    assert {n: (out / n).read_bytes() for n in _files(out)} == before
    assert _files(out.parent) == ["x"]
    with pytest.raises(KeyboardInterrupt):  # a first edit of a new name: no folder at all
        control.intervene(run, InterventionConfig(name="y", method="zero", concept="red"))
    assert _files(out.parent) == ["x"]


def test_an_interruption_after_the_earlier_folder_was_set_aside_puts_it_back(untrained_run, monkeypatch):
    run = untrained_run
    control.intervene(run, InterventionConfig(name="x", method="suppress", concept="red"))
    out = run.path / "interventions" / "x"
    before = _files(out)
    real_replace = os.replace

    def interrupted(src, dst):  # the final rename of the staged folder into place
        if os.path.basename(src).startswith(".x.partial-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        control.intervene(run, InterventionConfig(name="x", method="zero", concept="red"))
    assert _files(out) == before
    assert _files(out.parent) == ["x"]


def test_per_seed_grid_errors_are_the_edited_models(untrained_run):
    import csv

    from anchoring.kinds.colour.edits import colour_errors, selectivity_grid, stacked
    from anchoring.kinds.colour.plan import make_plan

    run = untrained_run
    spec = InterventionConfig(name="z", method="zero", concept="red")
    control.intervene(run, spec)
    rows = list(csv.DictReader((run.path / "interventions" / "z" / "per_seed.csv").open()))
    after = make_plan(spec, control.run_concepts(run)[0], run.latent_dim).reconstruct(run.models)
    want = colour_errors(after, selectivity_grid()).mean(-1)
    before = colour_errors(stacked(run.models), selectivity_grid()).mean(-1)
    for i, row in enumerate(rows):
        assert float(row["hsv_grid_mse"]) == pytest.approx(float(want[i])) and abs(float(want[i] - before[i])) > 1e-4


def test_an_edits_selectivity_median_is_the_median_seed(tmp_path):
    import numpy as np

    from anchoring.kinds.colour.kind import evaluate_interventions
    from anchoring.kinds.colour.objective import build_objective

    cfg = experiments.load("anchored", ["train.seeds=3"])
    torch.manual_seed(0)
    models = [build_model(cfg).eval() for _ in range(3)]
    out = evaluate_interventions(cfg, build_objective(cfg), models, [{"seed": s} for s in range(3)], tmp_path)
    assert any(np.median(e["selectivity"]) != pytest.approx(np.mean(e["selectivity"])) for e in out.values())
    for e in out.values():
        assert e["selectivity_median"] == pytest.approx(float(np.median(e["selectivity"])))


def test_relearning_refuses_more_samples_than_the_concept_has_colours(untrained_run):
    with pytest.raises(AnchoringError, match="distinct red colours can be drawn"):
        control.relearn(untrained_run, "red", samples=[4000], steps=1)


ANCHORED_CSV = (experiments.HERE / "anchored.csv").read_text()
BAD_OPTIONS = [  # each used to train: to NaN at a random early step, or silently on a loss of the wrong sign
    (["terms.0.power=2.5", "terms.0.shift=false"], "non-integer power 2.5 is NaN"),
    (["terms.0.power=-3"], "power must be a finite number > 0, got -3"),
    (["terms.0.power=0"], "power must be a finite number > 0, got 0"),
    (['terms.0.kind="euclidean-repulsion"', "terms.0.eps=0"], "eps must be a finite number > 0"),
    (['terms.0.kind="euclidean-repulsion"', "terms.0.eps=-1"], "eps must be a finite number > 0"),
    (["schedule=negative.csv"], "term weight 'anchor' must be ≥ 0 at every key, got -0.5"),
    (["schedule=extent.csv"], "extent must lie in [0, 1] at every key, got 1 to 1.5"),
    (["train.term_masks=[[true, false]]"], "term_masks rows must have one entry per term (3), got one of 2"),
    (['reactive=[{param="anchor", metric="loss", target=0.1, lowest=5, highest=1}]'], "highest (1) must be ≥ lowest (5)"),
    (['reactive=[{param="anchor", metric="loss", target=0.1, lowest=-1}]'], "lowest must be a finite number ≥ 0, got -1"),
]


@pytest.mark.parametrize("overrides,message", BAD_OPTIONS)
def test_term_options_and_schedule_values_that_cannot_train_are_refused_before_any_step(tmp_path, overrides, message):
    (tmp_path / "negative.csv").write_text(ANCHORED_CSV.replace("750,,,0.1,0.01,0.1,", "750,,,0.1,0.01,-0.5,"))
    lines = ANCHORED_CSV.strip().splitlines()
    (tmp_path / "extent.csv").write_text("\n".join([lines[0] + ",extent", lines[1] + ",1", *(r + "," for r in lines[2:-1]),
                                                    lines[-1] + ",1.5"]))
    overrides = [o.replace("=negative.csv", f"={tmp_path / 'negative.csv'}").replace("=extent.csv", f"={tmp_path / 'extent.csv'}")
                 for o in overrides]
    try:
        cfg = experiments.load("anchored", [*SHORT, *overrides])
        lifecycle.validate(cfg)
    except AnchoringError as e:
        assert message in str(e) and "\n" not in str(e), str(e)
    else:
        pytest.fail(f"{overrides} was accepted")


def test_a_schedule_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheets save "CSV UTF-8" with a BOM; the STEP column then read as '\\ufeffSTEP'."""
    sheet = tmp_path / "bom.csv"
    sheet.write_text(ANCHORED_CSV, encoding="utf-8-sig")
    cfg = experiments.load("anchored", [*SHORT, f"schedule={sheet}"])
    lifecycle.validate(cfg)
    assert cfg.schedule.startswith("\ufeffSTEP")  # the mark is still there; the parser reads past it


def test_an_edits_headline_prints_no_negative_zero():
    """A short run printed "selectivity R² median -0.00" for a median just under zero."""
    from anchoring.kinds.colour.kind import summary_lines

    summary = {"experiment": "anchored", "seeds": [], "interventions": {
        "suppress-red": {"table": [{"colour": "red", "after": 0.01}], "selectivity_median": -0.0012}}}
    line = next(x for x in summary_lines(summary) if isinstance(x, str) and x.startswith("suppress-red"))
    assert line.endswith("selectivity R² median 0.00"), line
