"""The colour transformer end to end, reduced: anchoring works on sequences, edits, resume, CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from anchoring import experiments
from anchoring.anchor.sequence import SequenceSite
from anchoring.cli import app
from anchoring.errors import AnchoringError
from anchoring.evaluate import transformer as ev
from anchoring.train.sequence import build_language, build_sequence_objective, train_arm

SMALL = ["transformer.width=32", "transformer.layers=2", "transformer.heads=4", "language.context=32",
         "concepts.0.label_scale=1.0", "terms.1.site=\"blocks.1\"", "terms.3.site=\"blocks.1\"",
         "terms.0.site=\"blocks.0\"", "terms.2.site=\"blocks.0\"", "transformer.eval_lines=256"]


@pytest.fixture(scope="module")
def small():
    cfg = experiments.load("transformer-anchor-residual", [*SMALL, "train.steps=250"])
    return cfg, {arm: train_arm(cfg, 0, anchored=arm == "anchored") for arm in ("anchored", "control")}


def _red_and_cyan(cfg, model):
    lang = build_language(cfg)
    v = build_sequence_objective(cfg, model).anchors("red")[0][1]
    amap = ev.alignment_map(model, lang, cfg.language.context, [SequenceSite("blocks.0")], v)[0, 0]
    lat = lang.lattice
    red, cyan = (int(lat.token(torch.tensor(c))) for c in ([5, 0, 0], [0, 5, 5]))
    return float(amap[red]), float(amap[cyan]), amap


def test_anchoring_pulls_red_to_its_anchor_and_leaves_cyan_alone(small):
    cfg, arms = small
    red, cyan, amap = _red_and_cyan(cfg, arms["anchored"].model)
    assert red > 0.7, red
    assert abs(cyan) < 0.3, cyan
    c_red, _, _ = _red_and_cyan(cfg, arms["control"].model)
    assert c_red < 0.5 < red  # the control, same seed and batches, has no such alignment
    lang = build_language(cfg)
    weight, sim = ev.concept_scores(lang)
    st = ev.alignment_stats(amap, weight, sim)
    assert st["margin"] > 0.3


def test_both_arms_saw_the_same_batches_and_the_control_has_no_terms(small):
    _, arms = small
    a, c = arms["anchored"], arms["control"]
    col = a.metric_names.index("labelled_lines")
    assert (a.metrics[:, col] == c.metrics[:, col]).all() and a.metrics[:, col].sum() > 0
    term = a.metric_names.index("anchor@1")
    assert not torch.isnan(torch.tensor(a.metrics[:, term])).any()
    assert torch.isnan(torch.tensor(c.metrics[:, term])).all()


def test_suppressing_the_anchor_hurts_red_lines_more_than_others(small):
    cfg, arms = small
    model = arms["anchored"].model
    lang = build_language(cfg)
    sets = ev.eval_lines(lang, 256)
    objective = build_sequence_objective(cfg, model)
    before = ev.accuracy_by_redness(model, lang, sets, cfg.language.context)[1]
    with ev.edited(model, objective.anchors("red"), "suppress"):
        after = ev.accuracy_by_redness(model, lang, sets, cfg.language.context)[1]
    drop = before - after
    assert drop[-1] > drop[0] + 0.1, (before, after)  # reddest bin loses more than the least red


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    cfg = experiments.load("transformer-anchor-residual", [*SMALL, "train.steps=30", "train.checkpoint_every=10"])
    whole = train_arm(cfg, 1, anchored=True)
    ckpt = tmp_path / "arm.safetensors"

    def crash(step):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_arm(cfg, 1, anchored=True, checkpoint=ckpt, progress=crash)
    resumed = train_arm(cfg, 1, anchored=True, checkpoint=ckpt)
    for (k, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), k
    assert (whole.metrics == resumed.metrics).all()


def test_bad_transformer_configs_fail_before_training():
    from anchoring import api

    for overrides, msg in ((["terms.0.positions=\"slot:x\""], "unknown slot"),
                           (["terms.0.site=\"blocks.9\""], "no module"),
                           (["terms.0.head=3"], "per-head|head"),
                           (["concepts.0.axis=64"], "axis 64"),
                           (["terms.2.positions=\"mellowmax\""], "labelled"),
                           (["transformer.heads=5"], "heads")):
        with pytest.raises(AnchoringError, match=msg):
            api.validate(experiments.load("transformer-anchor-residual", overrides))


@pytest.mark.slow
def test_cli_runs_a_transformer_experiment_and_writes_its_report(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "transformer-anchor-attention", "--seeds", "1", "--steps", "40", "--out", str(out),
                                 "-q", "--set", "transformer.width=32", "--set", "transformer.layers=2",
                                 "--set", "transformer.heads=4", "--set", "language.context=32",
                                 "--set", "transformer.eval_lines=128"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    arms = {m["arm"] for m in summary["models"]}
    assert arms == {"anchored", "control"}
    assert set(summary["interventions"]) == {"suppress-red-key", "ablate-red-key"}
    assert summary["interventions"]["suppress-red-key"]["control"]["per_seed"][0]["direction"] == "difference of means"
    assert any("held-out gap" in k for k in summary["targets"])
    for fig in ("alignment_margin.png", "alignment_containment.png", "accuracy_vs_redness.png", "training_curves.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    assert "Intervention: suppress-red-key" in (out / "report.html").read_text()
    assert "exact match per model" in r.stdout
    again = CliRunner().invoke(app, ["resume", str(out), "-q"])  # finished arms load from their checkpoints
    assert again.exit_code == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["models"] == summary["models"]
