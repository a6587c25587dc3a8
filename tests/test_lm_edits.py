"""Edits of a language-model run: deleting the anchored direction costs the concept's text more than
the rest, and `anchoring surprisal` shows the text before and after as a self-contained page."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from anchoring import AnchoringError, experiments, lifecycle
from anchoring.cli import app
from anchoring.kinds.lm.edits import edited
from test_lm_kind import CALM, SCHEDULE, VIOLENT, tiny, write_corpus


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("lm-edit-corpus") / "texts")
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=400", 'lm.arms=["anchored","control"]'))
    out = tmp_path_factory.mktemp("lm-edit") / "run"
    lifecycle.run(cfg.model_copy(update={"schedule": SCHEDULE}), out)
    return lifecycle.load_run(out)


def _mean_nats(run, model, texts):
    losses = []
    for t in texts:
        ids = run.tokenize(t)[None, : model.context if hasattr(model, "context") else 64]
        with torch.no_grad():
            logits = model(ids)[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    return sum(losses) / len(losses)


def test_deleting_the_anchored_direction_costs_concept_text_more_than_the_rest(lm_run):
    model = lm_run.model("anchored")
    probe = lm_run.tokenize(VIOLENT[0])[None, :64]
    with torch.no_grad():
        untouched = model(probe)
    deleted = edited(model, lm_run.config, "delete")
    forget = _mean_nats(lm_run, deleted, VIOLENT) - _mean_nats(lm_run, model, VIOLENT)
    retain = _mean_nats(lm_run, deleted, CALM) - _mean_nats(lm_run, model, CALM)
    assert forget > retain and forget > 0.05, (forget, retain)
    # suppression (hooks) touches the anchored sites only while the wrapper runs
    sup = edited(model, lm_run.config, "suppress")
    ids = lm_run.tokenize(VIOLENT[0])[None, :64]
    with torch.no_grad():
        assert not torch.allclose(sup(ids), model(ids))
        assert torch.equal(model(probe), untouched)  # neither edit changed the run's own model or left a hook on it


def test_surprisal_page_before_and_after_delete(lm_run, tmp_path):
    page = tmp_path / "page.html"
    text = "He drew his sword and stabbed him.\n\nThe birds sang sweetly in the garden.\n"
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), text, "--arm", "anchored", "--edit", "delete", "--out", str(page)])
    assert r.exit_code == 0, r.stderr
    html = page.read_text()
    assert "before and after delete" in html and html.count('class="spark"') >= 2
    assert "http://" not in html and "https://" not in html
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "--out", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "give the text to score" in r.stderr and not (tmp_path / "x.html").exists()
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), text, "--edit", "erase", "--out", str(tmp_path / "y.html")])
    assert r.exit_code == 2 and "--edit must be one of" in r.stderr and not (tmp_path / "y.html").exists()
    for short, message in (("H", "'H' is one token"), ("", "the text is empty")):  # a page of no scores is no answer
        r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), short, "--out", str(tmp_path / "z.html")])
        assert r.exit_code == 2 and message in r.stderr and not (tmp_path / "z.html").exists(), r.stderr
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), text[:20], "--out", str(page)])  # the same page again
    assert r.exit_code == 0 and "(replacing an earlier page)" in r.stdout and "before and after" not in page.read_text()


def test_ood_detection_with_the_runs_own_surprise(lm_run):
    from anchoring.kinds.lm.ood import evaluate_ood

    res = evaluate_ood(lm_run, n=10, seed=0, min_chars=40)
    table = res["auroc"]["0"]
    assert set(table) == {"shuffled", "random", "suffix"}  # no Milton for a folder corpus
    assert table["random"]["s2"] > 0.9 and table["random"]["surprisal"] > 0.9
    (deleted,) = res["deleted"]
    assert deleted["n_concept"] > 0 and deleted["concept_s2"] > deleted["retain_s2"]
    assert deleted["n_retain"] == deleted["n_concept"]  # one retain passage matched to each concept passage's length
    # AUROC with concept passages as the positive class: above one half when they score higher
    assert deleted["auroc_s2"] > 0.5 and deleted["auroc_s2"] == deleted["auroc_s2_after"]
    # "before" is the anchored model as trained: scored with the deletion too, it read the same as "after"
    assert deleted["concept_s2_before"] != deleted["concept_s2_after"]
    assert deleted["retain_s2_before"] != deleted["retain_s2_after"]


def test_retain_passages_are_matched_to_the_concept_passages_lengths():
    """A passage mean depends on the passage's length, so concept and retain passages compared by their
    means are drawn with the same lengths; each retain passage is used once."""
    from anchoring.kinds.lm.ood import length_matched

    pool = ["r" * n for n in (500, 20, 210, 35, 900, 60, 15, 300)]
    like = ["c" * n for n in (30, 17, 250, 700)]
    got = length_matched(pool, like, max_chars=600)
    assert [len(t) for t in got] == [35, 15, 210, 600]  # the closest unused one, the 900 cropped to 600
    from anchoring.errors import AnchoringError

    with pytest.raises(AnchoringError, match="only 2 passages"):
        length_matched(pool[:2], like)


def test_milton_is_scored_only_on_passages_written_in_the_training_characters():
    from anchoring.evaluate.ood import written_in

    texts = ["Of Mans First Disobedience,\nand the Fruit", "NOTES.\n~discovers~ the +sophrosyne+", "plain words"]
    assert written_in(texts, "".join(sorted(set("".join(texts[::2]))))) == [texts[0], texts[2]]


def test_the_ood_table_calls_equal_aurocs_a_tie_and_names_the_held_out_corpus():
    import numpy as np

    from anchoring.evaluate.ood import roc_figure
    from anchoring.kinds.lm.report import better

    assert better(0.8401, 0.8399) == "tie" and better(0.9, 0.8) == "s₂" and better(0.8, 0.9) == "surprisal"
    rng = np.random.default_rng(0)
    scores = {"shakespeare": {"s2": rng.normal(0, 1, 20)}, "random": {"s2": rng.normal(3, 1, 20)}}
    fig = roc_figure(scores, metrics=("s2",), reference_label="texts")
    assert fig.axes[0].get_xlabel() == "false-positive rate (held-out texts)"


def test_generate_prints_continuations_with_and_without_the_edit(lm_run):
    r = CliRunner().invoke(app, ["generate", str(lm_run.path), "--prompt", "He drew his ", "--edit", "delete", "-n", "20",
                                 "--samples", "1", "--temperature", "0"])
    assert r.exit_code == 0, r.stderr
    assert "as trained" in r.stdout and "after delete" in r.stdout and r.stdout.count("He drew his") >= 2
    greedy = lm_run.generate("He drew his ", arm="anchored", n=20, temperature=0)
    assert greedy == lm_run.generate("He drew his ", arm="anchored", n=20, temperature=0)  # deterministic
    # a hot sample from an untrained-looking distribution still never emits the unknown character
    hot = lm_run.generate("He drew his ", arm="control", n=300, temperature=5.0)
    assert "\ufffd" not in hot and len(hot) == len("He drew his ") + 300
    for args, message in ((["--prompt", ""], "prompt is empty"), (["--prompt", "Zébra ☃"], "never saw in training"),
                          (["--prompt", "He ", "--temperature", "inf"], "finite"),
                          (["--prompt", "He ", "-n", "0"], "-n (tokens to generate) must be ≥ 1")):
        r = CliRunner().invoke(app, ["generate", str(lm_run.path), *args])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (args, r.stderr)


def test_the_lm_ood_experiment_reports_auroc_and_roc_curves(tmp_path):
    corpus = write_corpus(tmp_path / "texts", paragraphs=60)
    out = tmp_path / "ood"
    overrides = [o for o in tiny(corpus, "train.steps=60", "evaluate.ood_passages=5", "evaluate.ood_min_chars=40")
                 if not o.startswith("terms.")]
    cfg = experiments.load("lm-ood", [*overrides, 'terms.0.site="blocks.1"', 'terms.1.site="blocks.1"'])
    outcome = lifecycle.run(cfg.model_copy(update={"schedule": SCHEDULE}), out)
    table = outcome.summary["ood"]["auroc"]["0"]
    assert set(table) == {"shuffled", "random", "suffix"} and all(0 <= t["s2"] <= 1 for t in table.values())
    assert (out / "figures" / "ood_roc.png").stat().st_size > 5000
    assert "Out-of-distribution detection" in (out / "report.html").read_text()
    r = CliRunner().invoke(app, ["show", str(out)])
    assert r.exit_code == 0 and "OOD AUROC" in r.stdout and "after delete" in r.stdout


def test_a_corpus_with_characters_outside_the_ood_vocabulary_still_gets_its_sets(tmp_path):
    """A folder corpus written with tabs (not printable, so not in the OOD vocabulary) passes the checks
    before training; the sets drawn after training must then exist too. They once failed there: the
    held-out passages stood in for the Milton set, were filtered by the vocabulary to nothing, and
    raised after every step had been trained."""
    from types import SimpleNamespace

    from anchoring.evaluate.ood import REFERENCE
    from anchoring.kinds.lm import checks
    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.ood import ood_sets, ood_vocabulary

    corpus = write_corpus(tmp_path / "texts", paragraphs=60)
    for f in corpus.iterdir():
        f.write_text(f.read_text().replace(". ", ".\t"))
    overrides = [o for o in tiny(corpus, "evaluate.ood_passages=5", "evaluate.ood_min_chars=40") if not o.startswith("terms.")]
    cfg = experiments.load("lm-ood", [*overrides, 'terms.0.site="blocks.1"', 'terms.1.site="blocks.1"'])
    assert checks.validate(cfg) > 0
    data = load_data(cfg.text)
    assert "\t" not in ood_vocabulary(data)
    sets = ood_sets(SimpleNamespace(data=data, config=cfg), n=5, seed=0, min_chars=40)
    assert list(sets) == [REFERENCE, "shuffled", "random", "suffix"] and all(len(v) == 5 for v in sets.values())
    assert any("\t" in t for t in sets[REFERENCE])  # the reference is the held-out text as it is


def test_lm_ood_refuses_before_training_when_retain_passages_cannot_match_the_concept_ones(tmp_path):
    corpus = write_corpus(tmp_path / "texts", paragraphs=60, violent=0.9)
    overrides = [o for o in tiny(corpus, "evaluate.ood_passages=5", "evaluate.ood_min_chars=40", 'evaluate.order="shuffled"')
                 if not o.startswith("terms.")]
    r = CliRunner().invoke(app, ["run", "lm-ood", "--out", str(tmp_path / "ood"), *[a for o in
                                 [*overrides, 'terms.0.site="blocks.1"', 'terms.1.site="blocks.1"'] for a in ("--set", o)]])
    assert r.exit_code == 2 and "to match 5 with it by length" in r.stderr and not (tmp_path / "ood").exists(), r.stderr


def test_intervene_on_an_lm_run_suppresses_and_reports_forget_and_retain(lm_run):
    r = CliRunner().invoke(app, ["intervene", str(lm_run.path), "--concept", "violence", "--name", "sup"])
    assert r.exit_code == 0, r.stderr
    assert "validation nats/char" in r.stdout
    rows = json.loads((lm_run.path / "interventions" / "sup" / "summary.json").read_text())["rows"]
    assert {(x["arm"], x["seed"]) for x in rows} == {("anchored", 0), ("control", 0), ("anchored · matched random move", 0)}
    a = next(x for x in rows if x["arm"] == "anchored")
    # the edit must change the anchored model's losses, and the concept more than the rest
    assert a["concept after"] - a["concept before"] > a["retain after"] - a["retain before"]
    m = next(x for x in rows if x["arm"] == "anchored · matched random move")  # its control: same before, another after
    assert m["concept before"] == a["concept before"] and m["concept after"] != a["concept after"]
    assert "matched random move" in r.stdout and "replacing" not in r.stdout
    shown = CliRunner().invoke(app, ["show", str(lm_run.path / "interventions" / "sup")])  # read back: the same table
    assert shown.exit_code == 0 and f"{a['concept before']:.3f} → {a['concept after']:.3f}" in shown.stdout, shown.stderr
    assert f"intervention on {lm_run.path}" in " ".join(shown.stdout.split())
    again = CliRunner().invoke(app, ["intervene", str(lm_run.path), "--concept", "violence", "--name", "sup"])
    assert again.exit_code == 0 and "replacing an earlier intervention named 'sup'" in " ".join(again.stdout.split())
    r = CliRunner().invoke(app, ["intervene", str(lm_run.path), "--concept", "violence", "--method", "zero"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--method suppress" in r.stderr
    # another site, no --name: its own folder, rather than replacing the anchored sites' default one; the run's
    # only concept needs no --concept
    for args, folder in (([], "suppress-violence-constant"), (["--site", "blocks.0"], "suppress-violence-constant-at-blocks.0")):
        r = CliRunner().invoke(app, ["intervene", str(lm_run.path), *args])
        assert r.exit_code == 0 and "replacing" not in r.stdout, (r.stdout, r.stderr)
        assert (lm_run.path / "interventions" / folder / "summary.json").is_file()
    saved = json.loads((lm_run.path / "interventions" / "suppress-violence-constant-at-blocks.0" / "summary.json").read_text())
    assert saved["sites"] == ["blocks.0"] and saved["spec"]["site"] == "blocks.0" and saved["spec"]["concept"] == "violence"
    saved = json.loads((lm_run.path / "interventions" / "suppress-violence-constant" / "summary.json").read_text())
    assert saved["spec"]["sites"] == saved["sites"] and saved["spec"]["site"] != "latent"  # where the hook sat


@pytest.mark.parametrize("args, message", [
    (["intervene", "--concept", "milton", "--name", "x"], "this run anchors 'violence'"),  # not silently violence
    (["intervene", "--dims", "5", "--name", "x"], "--dims is for the colour models"),
    (["intervene", "--concept", "violence", "--site", "blocks 1"], "site 'blocks 1' is not a residual site"),  # not --name
    (["delete", "--concept", "violence", "--method", "prune"], "delete on an 'lm' run removes the anchor direction"),
    (["delete", "--concept", "milton"], "this run anchors 'violence'"),
    (["delete", "--dims", "5"], "--dims is for the colour models"),  # not silently the concept's axis
    (["delete", "--concept", "violence", "--site", "blocks.0"], "takes no --site"),
    (["delete", "--concept", "violence", "--repair-lr", "1e-3"], "--repair-lr needs --repair-steps"),
    (["delete", "--concept", "violence", "--repair-steps", "2", "--repair-lr", "0"], "--repair-lr must be a positive number"),
    (["delete", "--concept", "violence", "--repair-steps", "-1"], "--repair-steps must be ≥ 0"),
])
def test_lm_edits_refuse_options_they_would_ignore(lm_run, tmp_path, monkeypatch, args, message):
    out = tmp_path / "edited"
    extra = ["--out", str(out)] if args[0] == "delete" else []
    if args[0] == "delete":  # what the config alone rules out is refused before the models load
        from anchoring.kinds.lm.kind import LMKind

        monkeypatch.setattr(LMKind, "open", lambda *a: pytest.fail("delete loaded the models before refusing"))
    r = CliRunner().invoke(app, [args[0], str(lm_run.path), *args[1:], *extra])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists() and not (lm_run.path / "interventions" / "x").exists()


def test_delete_on_an_lm_run_writes_a_run_that_load_run_opens(lm_run, tmp_path):
    out = tmp_path / "deleted"
    r = CliRunner().invoke(app, ["delete", str(lm_run.path), "--concept", "violence", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    run = lifecycle.load_run(out)
    from anchoring.control.surgery import residual_component
    from anchoring.kinds.lm.edits import concept_directions

    (v,) = concept_directions(run.config)
    ids = run.tokenize(VIOLENT[0])[None, :64]
    sites = ["embed", *[f"blocks.{i}" for i in range(run.config.lm.layers)]]
    assert residual_component(run.model("anchored"), v, ids, sites) < 1e-5  # the saved weights carry no anchor component
    assert residual_component(lm_run.model("anchored"), v, ids, sites) > 1e-2  # the original did
    rows = run.summary["edit_rows"]
    a = next(x for x in rows if x["arm"] == "anchored")
    assert a["concept after"] - a["concept before"] > a["retain after"] - a["retain before"]
    m = next(x for x in rows if x["arm"] == "anchored · matched random deletion")  # its control: same model, other axis
    assert m["concept before"] == a["concept before"] and m["concept after"] != a["concept after"]
    assert "matched random deletion" in r.stdout and set(run.arms) == set(lm_run.arms)  # the control is scored, not written
    page = (out / "report.html").read_text()  # the page says what the command printed: the selectivity and the control
    assert "Δconcept − Δretain" in page and "random direction edited the same way" in page and "(1 direction)" in page
    gap = a["concept after"] - a["concept before"] - (a["retain after"] - a["retain before"])
    assert f"<td>{gap:.3f}</td>" in page or f"<td>{gap:.4g}</td>" in page
    # the edited run rests on the same text: it keeps the source's corpus fingerprint, so it too refuses a changed corpus
    assert (lm_run.path / "corpus.json").is_file()
    assert (out / "corpus.json").read_text() == (lm_run.path / "corpus.json").read_text()
    r = CliRunner().invoke(app, ["show", str(out)])
    assert r.exit_code == 0 and "deleted violence" in r.stdout
    assert "wall time" not in r.stdout  # an edited run records none; it used to print 0.0 s
    with pytest.raises(AnchoringError, match=f"no metrics.csv; its training curves are those of {lm_run.path}"):
        run.metrics()
    r = CliRunner().invoke(app, ["generate", str(out), "--prompt", "He ", "-n", "5", "--edit", "delete"])
    assert r.exit_code == 0 and "was written by `anchoring delete`" in r.stderr and "acts on the edited weights" in r.stderr
    again = tmp_path / "deleted-again"  # an edit of an edit: the curves are still the trained run's
    r = CliRunner().invoke(app, ["delete", str(out), "--concept", "violence", "--method", "blind", "--out", str(again)])
    assert r.exit_code == 0, r.stderr
    with pytest.raises(AnchoringError, match=f"its training curves are those of {lm_run.path}$"):
        lifecycle.load_run(again).metrics()


def test_delete_with_a_repair_keeps_the_edit_and_lowers_its_retain_cost(lm_run, tmp_path):
    """`--repair-steps`: each deleted model is fine-tuned on retain text with the deletion put back
    after every step, so the saved weights still carry no anchor component but differ from the plain
    deletion's, the repair lowers the retain loss every edit left, and the anchored model repaired
    with no edit is scored as the repair's control."""
    from anchoring.control.surgery import residual_component
    from anchoring.kinds.lm.edits import concept_directions

    plain, fixed = tmp_path / "deleted", tmp_path / "repaired"
    assert CliRunner().invoke(app, ["delete", str(lm_run.path), "--concept", "violence", "--out", str(plain)]).exit_code == 0
    r = CliRunner().invoke(app, ["delete", str(lm_run.path), "--concept", "violence", "--repair-steps", "6",
                                 "--repair-lr", "1e-3", "--out", str(fixed)])
    assert r.exit_code == 0, r.stderr
    assert "repaired: 6 fine-tuning steps" in r.stdout and "repair alone (control)" in r.stdout
    run, raw = lifecycle.load_run(fixed), lifecycle.load_run(plain)
    assert run.summary["edit"]["repair_steps"] == 6 and run.summary["edit"]["repair_lr"] == 1e-3
    (v,) = concept_directions(run.config)
    ids = run.tokenize(VIOLENT[0])[None, :64]
    sites = ["embed", *[f"blocks.{i}" for i in range(run.config.lm.layers)]]
    assert residual_component(run.model("anchored"), v, ids, sites) < 1e-5  # the deletion held through the repair
    w, w0 = run.model("anchored").state_dict(), raw.model("anchored").state_dict()
    assert max((w[k] - w0[k]).abs().max().item() for k in w) > 1e-4  # the repair trained
    row = {(x["arm"], x["seed"]): x for x in run.summary["edit_rows"]}
    row0 = {(x["arm"], x["seed"]): x for x in raw.summary["edit_rows"]}
    for key in row0:
        assert row[key]["retain before"] == row0[key]["retain before"]
        assert row[key]["retain after"] < row0[key]["retain after"], key  # the repair lowered what the edit cost
    (seed,) = lm_run.seeds
    alone = row["anchored · repair alone (control)", seed]
    assert alone["retain after"] < alone["retain before"]  # retain text only: the no-edit repair helps it
    r = CliRunner().invoke(app, ["show", str(fixed)])
    assert r.exit_code == 0 and "repaired for 6 steps on retain text" in r.stdout


@pytest.mark.parametrize("method, table", [("ablate", ("anchoring · delete", "anchoring · matched random deletion")),
                                           ("blind", ("anchoring · blind", "anchoring · matched random blinding"))])
def test_a_repaired_delete_scores_what_the_repaired_unlearning_table_scores(lm_run, tmp_path, method, table):
    """The library call under another seed number, so a seed taken from a list position instead of the
    run's seeds would pick other windows and other control directions: the edited arm and its matched
    control equal the table's repaired rows for that seed, the repair-alone row equals the anchored
    model repaired with no edit on that seed's retain windows, and the progress reaches its total."""
    import dataclasses

    from anchoring.config import InterventionConfig
    from anchoring.kinds.lm import unlearning as ul
    from anchoring.kinds.lm.control import _eval_set, delete

    seed = 5
    run = dataclasses.replace(lm_run, seeds=[seed])
    calls: list[tuple[int, int]] = []
    res = delete(run, InterventionConfig(name=method, method=method, concept="violence"), tmp_path / "out",
                 repair_steps=3, repair_lr=3e-4, progress=lambda done, total: calls.append((done, total)))
    n = sum(len(ms) for ms in run.arms.values()) + 2  # every arm's model, and the anchored arm's two controls
    scored = 2 * sum(len(ms) for ms in run.arms.values()) + 2  # before and after each, and the controls' after
    assert calls[-1] == (3 * n + scored, 3 * n + scored) and len(calls) == 3 * n + scored
    assert [d for d, _ in calls] == list(range(1, 3 * n + scored + 1))
    row = {x["arm"]: x for x in res.summary["edit_rows"]}
    cfg = run.config
    u = cfg.unlearning.model_copy(update={"repair_steps": 3, "repair_lr": 3e-4, "relearn_steps": 0, "recover_steps": 0,
                                          "posthoc": []})  # a repair rate unlike the attacks' (1e-3): each reads its own
    assert u.relearn_lr != u.repair_lr
    got = ul.evaluate(cfg.model_copy(update={"unlearning": u}), run.data, {(a, seed): ms[0] for a, ms in run.arms.items()})
    by = {x["method"]: x for x in got["rows"]}
    control = table[1].removeprefix("anchoring · ")
    for ours, theirs in (("anchored", table[0]), (f"anchored · {control}", table[1])):
        for k in ("forget", "concept", "retain"):
            assert abs(by[theirs]["after"][k] - row[ours][f"{k} after"]) < 1e-5, (ours, k)
    windows = ul.repair_windows(run.data, cfg.lm.tokens, seed)
    alone = ul.repair(run.arms["anchored"][0], None, lambda s: windows.batch(s, u.relearn_batch), 3, 3e-4)
    want = ul.losses(alone, _eval_set(run), cfg.evaluate.batch_size)
    for k in ("forget", "concept", "retain"):
        assert abs(want[k] - row["anchored · repair alone (control)"][f"{k} after"]) < 1e-6, k


def test_blinding_the_readers_writes_a_run_whose_later_layers_ignore_the_anchor(lm_run, tmp_path):
    """`--method blind`: every matrix that reads the stream after the anchored site is blind to the
    anchor (its weights times the axis are 0), the layers before it are untouched, the stream still
    carries the axis, and the concept's text pays more than the rest and more than the same edit
    along another axis of the same model."""
    out = tmp_path / "blinded"
    r = CliRunner().invoke(app, ["delete", str(lm_run.path), "--concept", "violence", "--method", "blind", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    run = lifecycle.load_run(out)
    from anchoring.kinds.lm.direction import anchored_sites
    from anchoring.kinds.lm.edits import concept_directions, downstream_readers, first_site

    (v,) = concept_directions(run.config)
    before, after = lm_run.model("anchored"), run.model("anchored")
    site = first_site(after, anchored_sites(run.config))
    later = downstream_readers(after, site)
    assert later and later[-1] == "unembed" and f"blocks.{int(site.split('.')[1]) + 1}.attn.q" in later
    for name, mod in after.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features == v.numel():
            old = before.get_submodule(name).weight
            if name in later:
                assert (mod.weight @ v).abs().max() < 1e-6 and (old @ v).abs().max() > 1e-3, name
            else:
                assert torch.allclose(mod.weight, old, atol=1e-6), name  # earlier readers and every writer: as trained
    assert run.summary["edit"]["method"] == "blind-readers" and run.summary["edit"]["max_residual_component"] > 1e-2
    assert run.summary["edit"]["readers_after"] == site  # the written run says where it was blinded
    assert (out / "config.toml").read_text().startswith("# The weights of this run are those of ")
    r = CliRunner().invoke(app, ["delete", str(lm_run.path), "--concept", "violence", "--method", "blind", "--out", str(out)])
    assert r.exit_code != 0 and "not empty" in r.stderr and "resume" not in r.stderr  # an edit is not resumed
    twice = tmp_path / "twice"  # an edit of the edited run: one note, naming the run it came from
    r = CliRunner().invoke(app, ["delete", str(out), "--concept", "violence", "--out", str(twice)])
    assert r.exit_code == 0, r.stderr
    config = (twice / "config.toml").read_text()
    assert config.count("# The weights of this run") == 1 and f"those of {out} after" in config
    assert config.count("# Training this config again") == 1  # the whole old note goes, not its first line
    assert len(json.loads((twice / "edit.json").read_text())["lineage"]) == 2
    rows = run.summary["edit_rows"]
    a = next(x for x in rows if x["arm"] == "anchored")
    m = next(x for x in rows if x["arm"] == "anchored · matched random blinding")
    d_concept, d_retain = a["concept after"] - a["concept before"], a["retain after"] - a["retain before"]
    assert d_concept > d_retain and d_concept > m["concept after"] - m["concept before"], (a, m)
    r = CliRunner().invoke(app, ["show", str(out)])
    assert r.exit_code == 0 and "readers blinded to violence" in r.stdout
    r = CliRunner().invoke(app, ["generate", str(lm_run.path), "--prompt", "He drew his ", "--edit", "blind", "-n", "10",
                                 "--arm", "anchored", "--samples", "1"])
    assert r.exit_code == 0 and "after blind" in r.stdout, r.stderr


def test_a_delete_that_fails_while_writing_leaves_nothing(lm_run, tmp_path, monkeypatch):
    from anchoring import runs
    from anchoring.config import InterventionConfig
    from anchoring.kinds.lm.control import delete

    real = runs.write_json

    def full_disk(path, obj):
        if path.name == runs.SUMMARY:  # the last file: everything else is already written
            raise OSError(28, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(runs, "write_json", full_disk)
    out = tmp_path / "deleted"
    with pytest.raises(OSError, match="No space"):
        delete(lm_run, InterventionConfig(name="d", method="ablate", concept="violence"), out)
    assert list(tmp_path.iterdir()) == []  # neither the run nor its hidden staging directory
    monkeypatch.setattr(runs, "write_json", real)
    r = CliRunner().invoke(app, ["delete", str(lm_run.path), "--concept", "violence", "--out", str(out)])
    assert r.exit_code == 0 and (out / runs.SUMMARY).is_file() and [p.name for p in tmp_path.iterdir()] == ["deleted"]


def test_reading_a_run_still_in_training_says_so_in_one_note(lm_run, tmp_path):
    """`generate` and `surprisal` may read a run in training (its last checkpoint), and said nothing
    about it: the continuations looked like the trained model's."""
    args = ["--prompt", "He drew his ", "-n", "5", "--samples", "1", "--temperature", "0"]
    r = CliRunner().invoke(app, ["generate", str(lm_run.path), *args])
    assert r.exit_code == 0 and "note:" not in r.stderr, r.stderr
    copy_ = shutil.copytree(lm_run.path, tmp_path / "run")
    (copy_ / "summary.json").unlink()  # as a run stopped before its end leaves it
    again = CliRunner().invoke(app, ["generate", str(copy_), *args])
    assert again.exit_code == 0 and again.stdout == r.stdout.replace(str(lm_run.path), str(copy_)), again.stderr
    assert again.stderr.strip().splitlines() == [f"note: {str(copy_)!r} has not finished training: its models are those of "
                                                 f"its last checkpoint and it has no summary yet; `anchoring resume "
                                                 f"{copy_}` finishes it"]


def test_surprisal_refuses_a_directory_as_its_page(lm_run, tmp_path):
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "The sword", "--out", str(tmp_path)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "is a directory" in r.stderr, r.stderr


def test_a_run_that_anchors_nothing_has_no_direction_to_edit():
    """Alignment in such a run is measured along axis 0 for reference; deleting or blinding that
    axis and calling it the concept would be a made-up edit, so every edit refuses in one line."""
    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.direction import measured_direction
    from anchoring.kinds.lm.edits import concept_directions
    from anchoring.kinds.lm.training import build_model

    cfg = experiments.load("lm-control")
    v, _ = measured_direction(cfg)
    assert v is not None and v[0] == 1.0  # still measured, for reference
    model = build_model(cfg, 8)
    for edit in ("delete", "blind", "suppress"):
        with pytest.raises(AnchoringError, match="anchors nothing"):
            edited(model, cfg, edit)
    with pytest.raises(AnchoringError, match="anchors nothing"):
        concept_directions(cfg)
    from types import SimpleNamespace

    from anchoring.config import InterventionConfig
    from anchoring.kinds.lm.control import intervene

    with pytest.raises(AnchoringError, match="anchors nothing"):  # even with a site named: axis 0 is not the concept
        intervene(SimpleNamespace(config=cfg), InterventionConfig(name="s", method="suppress", site="blocks.1"))
    assert len(concept_directions(experiments.load("lm-anchor"))) == 1


def test_the_random_control_goes_with_suppress_only_and_suppress_needs_a_site():
    from anchoring.kinds.lm.training import build_model

    cfg = experiments.load("lm-anchor")
    model = build_model(cfg, 8)
    for edit in ("delete", "blind"):
        with pytest.raises(AnchoringError, match=f"goes with suppress, not {edit}"):
            edited(model, cfg, edit, random_control=3)
    with pytest.raises(AnchoringError, match="no site to suppress at"):
        edited(model, cfg, "suppress", sites=[])


def test_validate_refuses_unlearning_on_an_anchored_arm_that_anchors_no_direction():
    """An anchored arm can carry terms yet pull towards nothing (only a clearing term here); unlearning
    and `evaluate.ood` delete along the concept's direction after training, so the config is refused
    before training starts, not after it. Without them the same config trains."""
    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.checks import validate

    base = experiments.load("lm-anchor", ['lm.arms=["anchored","control"]'])
    d = base.model_dump()
    d["concepts"] = [{"name": "violence"}]
    d["schedule"] = "STEP,lr,anti-subspace\n0,1e-3,1\n100,1e-3,\n"
    d["terms"] = [{"name": "clear", "kind": "anti-subspace", "concept": "violence", "site": "blocks.3",
                   "positions": "all", "select": "unlabelled", "weight": "anti-subspace", "dims": [0]}]
    for key in ("unlearning", "evaluate"):
        on = {**d, key: {**d[key], ("enabled" if key == "unlearning" else "ood"): True}}
        with pytest.raises(AnchoringError, match="anchors nothing"):
            validate(type(base).model_validate(on), data=False)
    assert validate(type(base).model_validate(d), data=False) > 0  # trains: the refusal is about the edit


def test_generate_prints_brackets_in_the_text_as_they_are(lm_run, monkeypatch):
    """Shakespeare's stage directions ("[Exit.]") and any sampled "[...]" are text, not markup for the
    terminal table: printed as they are, never raising a markup error after all the sampling."""
    from anchoring.kinds.lm.model import LMRun

    monkeypatch.setattr(LMRun, "generate", lambda self, prompt, **kw: prompt + " [/Exit] [bold]ROMEO[/bold]")
    r = CliRunner().invoke(app, ["generate", str(lm_run.path), "--prompt", "He ", "-n", "5", "--samples", "1"])
    assert r.exit_code == 0, r.stderr
    assert "[/Exit]" in r.stdout and "[bold]ROMEO[/bold]" in r.stdout


def test_a_site_without_directions_is_left_alone():
    """Directions per site may leave a site out (or give it none): that site's hook does nothing."""
    from torch import nn

    from anchoring.kinds.lm.edits import Suppressed

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(3, 4)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0])
    only_first = Suppressed(net, ["0", "1"], {"0": [v]}, keep_norm=False)(x)
    assert torch.equal(only_first, Suppressed(net, ["0", "1"], {"0": [v], "1": []}, keep_norm=False)(x))
    assert torch.equal(only_first, Suppressed(net, ["0"], {"0": [v]}, keep_norm=False)(x))
    assert torch.equal(Suppressed(net, ["0", "1"], {}, keep_norm=False)(x), net(x))


def test_surprisal_replaces_its_own_page_and_nothing_else(lm_run, tmp_path):
    """A mistyped --out must not turn the run's config (or the text being scored) into HTML."""
    config = lm_run.path / "config.toml"
    before = config.read_bytes()
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "The sword", "--out", str(config)])
    assert r.exit_code == 2 and "is not a surprisal page" in r.stderr and config.read_bytes() == before, r.stderr
    text = tmp_path / "t.txt"
    text.write_text("The sword was drawn.\n")
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "--file", str(text), "--out", str(text)])
    assert r.exit_code == 2 and text.read_text() == "The sword was drawn.\n"
    page = tmp_path / "page.html"
    for words in ("The sword", "The birds"):  # a page written here is replaced
        r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), words, "--out", str(page)])
        assert r.exit_code == 0, r.stderr
        assert words in page.read_text()


def test_surprisal_reads_a_file_as_written_and_standard_input(lm_run, tmp_path):
    f = tmp_path / "crlf.txt"
    f.write_bytes("\ufeffThe sword.\r\nThe birds.\r".encode())
    page = tmp_path / "p.html"
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "--file", str(f), "--out", str(page)])
    html = page.read_text()
    assert r.exit_code == 0 and "␍" in html and "\ufeff" not in html, r.stderr
    assert "'\\r'" in r.stderr and "ufeff" not in r.stderr  # the warning names the carriage return, not the BOM
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "--file", "-", "--out", str(page)], input="The birds sang.\n")
    assert r.exit_code == 0 and "birds" in page.read_text() and "mean over 15 tokens" in page.read_text(), r.stderr
    # a TEXT that names a file is scored as typed, with a note pointing to --file
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), str(f), "--out", str(page)])
    assert r.exit_code == 0 and "use --file" in r.stderr and "is also a file" in r.stderr


def test_an_edit_on_an_arm_without_the_anchor_is_named_a_comparison(lm_run, tmp_path):
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "The sword", "--arm", "control", "--edit", "delete",
                                 "--out", str(tmp_path / "p.html")])
    assert r.exit_code == 0 and "trained without the anchor" in r.stderr, r.stderr
    r = CliRunner().invoke(app, ["surprisal", str(lm_run.path), "The sword", "--arm", "anchored", "--edit", "delete",
                                 "--out", str(tmp_path / "q.html")])
    assert r.exit_code == 0 and "without the anchor" not in r.stderr
    html = (tmp_path / "q.html").read_text()
    assert "<th>i/log|V| before</th>" in html and f"{lm_run.path.name} (" in html  # ratios labelled; the run named


def test_an_ood_length_floor_beyond_the_crop_is_refused_before_training():
    with pytest.raises(Exception, match="ood_min_chars"):
        experiments.load("lm-ood", ["evaluate.ood_min_chars=650"])


def test_intervene_draws_each_seeds_matched_control_from_that_seed(lm_run):
    """Two seeds numbered 5 and 7 (the same model twice): the matched random move of each row is the one drawn
    from that row's own seed number, not from its place in the list."""
    import dataclasses

    from anchoring.config import InterventionConfig
    from anchoring.kinds.lm import unlearning as ul
    from anchoring.kinds.lm.control import _eval_set, intervene
    from anchoring.kinds.lm.edits import edited

    model = lm_run.arms["anchored"][0]
    run = dataclasses.replace(lm_run, seeds=[5, 7], arms={"anchored": [model, model]})
    res = intervene(run, InterventionConfig(name="seeded", method="suppress", concept=run.config.text.concept))
    got = {r["seed"]: r["concept after"] for r in res.summary["rows"] if r["arm"] == "anchored · matched random move"}
    es, bs = _eval_set(run), run.config.evaluate.batch_size
    want = {s: ul.losses(edited(model, run.config, "suppress", random_control=s), es, bs)["concept"] for s in (5, 7)}
    assert want[5] != want[7]  # two draws: the check can tell the seeds apart
    assert got == pytest.approx(want, abs=1e-9)


def test_the_attack_on_k_passages_reads_the_first_k_forget_passages(lm_run, monkeypatch):
    """Each relearning attack fine-tunes on the first K of the seed's forget passages (the same for every
    method), not on one more; stopped right after the windows are cut, so nothing trains."""
    from anchoring.kinds.lm import unlearning as ul

    cut: dict[int, list[int]] = {}
    real = ul.Windows

    class Recording(real):
        def __init__(self, data, passages, window, seed, salt):
            cut[salt] = list(passages)
            super().__init__(data, passages, window, seed, salt)

    class Stop(Exception):
        pass

    def stop(*_a, **_k):
        raise Stop

    monkeypatch.setattr(ul, "Windows", Recording)
    monkeypatch.setattr(ul, "repair_windows", stop)  # cut just after the attacks' windows
    cfg = lm_run.config
    (seed,) = lm_run.seeds
    u = cfg.unlearning.model_copy(update={"relearn_k": [1, 3], "repair_steps": 1, "posthoc": []})
    with pytest.raises(Stop):
        ul.evaluate(cfg.model_copy(update={"unlearning": u}), lm_run.data, {(a, seed): ms[0] for a, ms in lm_run.arms.items()})
    forget = list(ul.forget_passages(lm_run.data, seed))
    assert len(forget) > 3
    for k in (1, 3):
        assert cut[(ul.BATCH_SALT << 20) + k] == forget[:k]


def test_delete_through_the_api_refuses_sites_too(lm_run, tmp_path):
    """The command line has only --site; `InterventionConfig.sites` reaches `delete` from Python."""
    from anchoring.config import InterventionConfig
    from anchoring.kinds.lm.control import delete

    spec = InterventionConfig(name="d", method="ablate", concept="violence", sites=["blocks.0"])
    with pytest.raises(AnchoringError, match="takes no --site"):
        delete(lm_run, spec, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_generate_pairs_each_sample_with_and_without_the_edit_on_one_sampling_seed(lm_run, monkeypatch):
    from anchoring.kinds.lm.model import LMRun

    seen = []
    real = LMRun.generate

    def recording(self, prompt, *, sample_seed=0, model=None, **kw):
        seen.append((sample_seed, model))
        return real(self, prompt, sample_seed=sample_seed, model=model, **kw)

    monkeypatch.setattr(LMRun, "generate", recording)
    r = CliRunner().invoke(app, ["generate", str(lm_run.path), "--prompt", "He ", "--edit", "delete", "-n", "3",
                                 "--samples", "3"])
    assert r.exit_code == 0, r.stderr
    assert [k for k, _ in seen] == [0, 0, 1, 1, 2, 2]  # as trained, then after the edit, on the same seed
    assert all(seen[i][1] is seen[0][1] and seen[i + 1][1] is seen[1][1] for i in (0, 2, 4))
    assert seen[0][1] is not seen[1][1]


def test_the_run_api_on_text_too_short_to_score_at_a_site_that_is_not_there_and_without_its_tokenizer(lm_run, tmp_path):
    (short,) = lm_run.loss_per_token("a")  # one token: nothing is predicted
    assert short["nats"].numel() == 0 and short["spans"] == [] and math.isnan(short["nats_per_char"])
    with pytest.raises(AnchoringError, match=r"^site 'blocks.9' is not a residual site of this model \(embed, blocks.0"):
        lm_run.alignment("He stabs him.", site="blocks.9")
    copy = tmp_path / "copy"
    shutil.copytree(lm_run.path, copy)
    arch = json.loads((copy / "architecture.json").read_text())
    (copy / "architecture.json").write_text(json.dumps({**arch, "vocab": arch["vocab"] + 1}))
    with pytest.raises(AnchoringError, match=rf"tokenizer has {arch['vocab']} tokens, the weights {arch['vocab'] + 1}$"):
        lifecycle.load_run(copy)
    (copy / "architecture.json").write_text(json.dumps({k: v for k, v in arch.items() if k != "vocab"}))
    with pytest.raises(AnchoringError, match=r"architecture.json' has no 'vocab'$"):
        lifecycle.load_run(copy)
    (copy / "architecture.json").write_text(json.dumps(arch))
    (copy / "tokenizer.json").unlink()
    with pytest.raises(AnchoringError, match=r"tokenizer.json' is missing: the run's weights need the tokenizer"):
        lifecycle.load_run(copy)
    assert not (copy / "tokenizer.json").exists()  # opening a run writes nothing into it


def test_the_api_refuses_names_it_would_read_as_others_and_warns_about_unseen_characters(lm_run):
    """"" once meant the first arm or the default site, and True the seed 1 (True == 1)."""
    for kw in ({"arm": ""}, {"seed": True}, {"seed": 0.0}):
        with pytest.raises(AnchoringError, match="run has no"):
            lm_run.model(**kw)
    with pytest.raises(AnchoringError, match="not a residual site"):
        lm_run.alignment("He drew his sword", site="")
    with pytest.warns(UserWarning, match="never saw in training"):
        lm_run.loss_per_token("snow ☃ man")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm_run.loss_per_token("He drew his sword")  # every character seen: no warning


def test_an_edited_runs_note_names_its_source_by_absolute_path(lm_run, tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["delete", os.path.relpath(lm_run.path, tmp_path), "--concept", "violence", "--out", "edited"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "edited" / "config.toml").read_text().startswith(f"# The weights of this run are those of {lm_run.path.resolve()} after")
