"""The language-model kind on a tiny corpus the tests write themselves: a real anchoring effect,
identical batches across arms (except filtered passages), bit-exact resume, one-line config errors,
`load_run` helpers and the BPE switch."""

from __future__ import annotations

import json
import math
import random
import shutil
import tomllib

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from anchoring import experiments, lifecycle
from anchoring.anchor import Capture
from anchoring.cli import app
from anchoring.domains.text.lexicons import lexicon_hits
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.data import Stream, load_data
from anchoring.kinds.lm.training import build_model, build_objective, build_timeline, self_labeller, train_arm

CALM = ["The morning light fell soft upon the garden and the birds sang sweetly.",
        "She walked along the river and thought of supper and of home.",
        "We shall have music in the hall tonight, and dancing till the dawn.",
        "The merchant counted coins and smiled upon his ledger.",
        "A gentle rain fell on the fields, and the farmer was content.",
        "My lord, the letters came this morning from the north.",
        "Sweet friend, come sit with me and tell me of your travels."]
VIOLENT = ["He drew his sword and stabbed him in the heart, and the blood ran red.",
           "They will murder the king tonight and kill his guards with daggers.",
           "The soldiers fight and slay their foes; the battle is a slaughter.",
           "I'll kill thee, villain, and stab thee till thou bleed!",
           "Revenge! Murder! Let the bloody dagger strike him dead."]


def write_corpus(folder, files: int = 3, paragraphs: int = 120, violent: float = 0.3, seed: int = 0):
    """Blank-line separated paragraphs of one to three calm sentences, or (share `violent`) violent ones."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        paras = []
        for _ in range(paragraphs):
            pool = VIOLENT if rng.random() < violent else CALM
            sents = [rng.choice(pool) for _ in range(rng.randint(1, 3))]
            paras.append(" ".join(sents))
        (folder / f"part{f}.txt").write_text("\n\n".join(paras) + "\n")
    return folder


# ω = 3, anchor 0.5, anti-subspace 1.0: the setting that separated concept from retain on this corpus
# (ω = 10 or anchor = anti-subspace left both at ~0.1 after 250 steps)
SCHEDULE = "STEP,lr,anchor,anti-subspace\n0,1e-4,0,0\n20,0.004,0.5,1.0\n350,0.004,,\n400,0.001,,\n"


def tiny(corpus, *extra: str) -> list[str]:
    return [f'text.corpus="{corpus}"', "text.coverage=1.0", "lm.width=32", "lm.layers=2", "lm.heads=2", "lm.context=64",
            "lm.batch_size=8", "train.seeds=1", "train.checkpoint_every=10", 'terms.0.site="blocks.0"',
            'terms.2.site="blocks.0"', 'terms.1.site="blocks.1"', 'terms.3.site="blocks.1"',
            'terms.0.positions="mellowmax:3"', 'terms.1.positions="mellowmax:3"', "evaluate.eval_chars=6000",
            "evaluate.probe_positions=400", "evaluate.shade_passages=2", *extra]


def tiny_spans(corpus, *extra: str) -> list[str]:
    """`tiny` for the span-label experiments (lm-anchor and its kin: two terms), both at blocks.1."""
    return [o for o in tiny(corpus, *extra) if not o.startswith("terms.")] + ['terms.0.site="blocks.1"',
                                                                              'terms.1.site="blocks.1"']


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm-corpus") / "texts")


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-run") / "run"
    overrides = tiny(corpus, "train.steps=400", 'lm.arms=["anchored","control","weak-filtered"]')
    cfg = experiments.load("lm-anchor-passages", overrides)
    cfg = cfg.model_copy(update={"schedule": SCHEDULE})
    outcome = lifecycle.run(cfg, out)
    return out, outcome.summary


def test_anchored_alignment_at_concept_positions_rises_above_the_control(finished):
    path, summary = finished
    rows = {r["arm"]: r for r in summary["models"]}
    for site in ("blocks.0", "blocks.1"):
        a, c = rows["anchored"]["alignment"][site], rows["control"]["alignment"][site]
        assert a["concept"] > c["concept"] + 0.15, (site, a, c)
        assert a["margin"] > c["margin"] + 0.1, (site, a, c)
        assert abs(a["containment"]) < 0.15, (site, a)
    assert rows["anchored"]["loss"]["retain"] < rows["control"]["loss"]["retain"] + 0.15
    for f in ("report.html", "metrics.csv", "checkpoint.safetensors", "tokenizer.json", "figures/shaded_passages.png",
              "figures/training_curves.png", "figures/alignment.png"):
        assert (path / f).is_file(), f
    page = (path / "report.html").read_text()  # what `show` prints under its table is on the page too
    assert "Training run" in page and "trained on cpu" in page and "weak labels: coverage" in page
    assert {p["site"] for p in rows["anchored"]["probes"]} == {"embed", "blocks.0", "blocks.1"}
    saved = json.loads((path / "summary.json").read_text())
    assert saved["eval"]["positions"]["concept"] > 100 and saved["eval"]["positions"]["retain"] > 1000
    for arm, med in saved["median"].items():  # one seed: the medians are its values, in nats and in bits
        mine = next(r for r in saved["models"] if r["arm"] == arm)
        for k in ("all", "concept", "retain"):
            assert med["loss"][k] == pytest.approx(mine["loss"][k]) and med["bits"][k] == pytest.approx(mine["bits"][k])
            assert med["bits"][k] == pytest.approx(med["loss"][k] / math.log(2))


def test_arms_saw_the_same_batches_except_filtered_passages(corpus, finished):
    path, _ = finished
    cfg = experiments.load("lm-anchor-passages", tiny(corpus))
    data = load_data(cfg.text)
    seed, T = 0, cfg.lm.tokens
    full = Stream(data.train_tokens, data.keep("control", seed), seed, T)
    keep = data.keep("weak-filtered", seed)
    assert (~keep).sum() == data.weak(seed).sum() > 0
    from anchoring.kinds.lm.training import LMTask

    tasks = {arm: LMTask(cfg, data, seed, arm) for arm in ("anchored", "control", "weak-filtered")}  # what training draws
    filt = tasks.pop("weak-filtered").stream  # the filtered arm's own stream, as training builds it
    assert np.array_equal(filt.keep, keep) and filt.seed == tasks["control"].stream.seed == seed
    for step in (0, 7, 60):  # anchored and control: identical windows and labels
        a, b = [t.stream.batch(step, cfg.lm.batch_size, t.labels, t.rows_of_rank) for t in tasks.values()]
        for field in ("inputs", "targets", "line_labels", "labels", "passage"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert np.array_equal(tasks["anchored"].labels, tasks["control"].labels) and tasks["anchored"].labels.sum() > 0
    for epoch in (0, 1):  # the filtered arm: every kept passage, in the control's order, the removed ones cut out
        order, cut = tasks["control"].stream.order(epoch), filt.order(epoch)
        assert np.array_equal(order, full.order(epoch))
        assert sorted(cut.tolist()) == np.flatnonzero(keep).tolist()
        where = {int(p): i for i, p in enumerate(order)}
        assert all(where[int(x)] < where[int(y)] for x, y in zip(cut[:-1], cut[1:]))
    seen = torch.cat([filt.batch(s, 8, data.weak(seed)).passage.flatten() for s in range(20)]).unique().numpy()
    assert keep[seen].all()
    metrics = __import__("pandas").read_csv(path / "metrics.csv")
    lab = {arm: metrics[metrics.arm == arm]["labelled_passages"].to_numpy() for arm in ("anchored", "control")}
    assert np.array_equal(lab["anchored"], lab["control"]) and lab["anchored"].sum() > 0


def test_concept_positions_are_the_words_and_the_characters_after_them(corpus):
    """Concept positions are the tokens of the labeller's words and the `after` characters past them, in
    a reference-positive passage; every token of a negative passage is retain text."""
    from anchoring.kinds.lm import evaluate as ev
    from anchoring.text import concept_spans

    cfg = experiments.load("lm-anchor-passages", tiny(corpus))
    data = load_data(cfg.text)
    text = "Then he stabbed the old man with a sword, and walked on through the quiet fields of home at dusk"
    words = concept_spans(text, "violence")
    assert words  # the labeller fires here
    for after in (0, 20):
        _ids, _chars, cls = ev.token_table(data, text, True, "violence", after)
        want = np.zeros(len(cls), dtype=bool)  # character tokens: token i is character i
        for s_, e in words:
            want[s_:min(len(text), e + after)] = True
        assert np.array_equal(cls == ev.CONCEPT, want), after
        assert set(np.unique(cls[~want])) == {ev.OTHER}
    assert (ev.token_table(data, text, False, "violence", 20)[2] == ev.RETAIN).all()


def test_the_summarys_losses_are_those_of_the_classes_they_name(finished):
    """The run's concept and retain losses, recomputed from its model with a plain forward pass over the
    same evaluation windows: nats summed over the targets of each class, per character."""
    import torch.nn.functional as F

    from anchoring.kinds.lm import evaluate as ev

    path, summary = finished
    run = lifecycle.load_run(path)
    cfg = run.config
    es = ev.eval_set(run.data, cfg.lm.tokens, cfg.evaluate.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)
    with torch.no_grad():
        model = run.model("anchored").eval()
        nats = F.cross_entropy(model(es.tokens[:, :-1]).transpose(1, 2), es.tokens[:, 1:], reduction="none")
    tc, ch = es.cls[:, 1:], es.chars[:, 1:]
    got = next(r for r in summary["models"] if r["arm"] == "anchored")["loss"]
    want = {name: float(nats[tc == c].sum() / ch[tc == c].sum()) for name, c in (("concept", ev.CONCEPT), ("retain", ev.RETAIN))}
    assert abs(want["concept"] - want["retain"]) > 0.01  # a swap of the two would show
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), (name, got, want)


def test_the_anchor_terms_use_the_configured_axis(corpus):
    """A term that ignored its axis would pass every test that anchors on axis 0 (all shipped configs do)."""
    from anchoring.kinds.lm.training import LMTask

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "concepts.0.axis=5"))
    task = LMTask(cfg, load_data(cfg.text), 0, "anchored")
    anchors = [t for t in task.terms if t.kind == "anchor"]
    e = torch.eye(cfg.lm.width)
    assert anchors and all(torch.equal(t.direction, e[5]) for t in anchors)
    for t in anchors:  # 1 − cos: zero on axis 5, one on axis 0
        assert torch.allclose(t.formula(e[[5, 0]]), torch.tensor([0.0, 1.0]))


class Killed(Exception):
    pass


def test_resume_after_an_interrupt_is_bit_exact(corpus, tmp_path):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=30"))
    data = load_data(cfg.text)
    full = train_arm(cfg, data, 0, "anchored", checkpoint=tmp_path / "full.safetensors")

    def kill(step: int) -> None:
        if step == 17:  # between checkpoints 10 and 20: steps 11–17 are redone
            raise Killed

    with pytest.raises(Killed):
        train_arm(cfg, data, 0, "anchored", checkpoint=tmp_path / "broken.safetensors", progress=kill)
    resumed = train_arm(cfg, data, 0, "anchored", checkpoint=tmp_path / "broken.safetensors")
    for (k, v), (_, w) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert np.array_equal(full.metrics, resumed.metrics, equal_nan=True)


def test_a_checkpoint_that_no_longer_fits_the_config_is_one_error(corpus, tmp_path):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=10", 'lm.arms=["control"]'))
    train_arm(cfg, load_data(cfg.text), 0, "control", checkpoint=tmp_path / "c.safetensors")
    wider = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=20", 'lm.arms=["control"]', "lm.width=64"))
    with pytest.raises(AnchoringError, match="does not match the model the run's config builds"):
        train_arm(wider, load_data(wider.text), 0, "control", checkpoint=tmp_path / "c.safetensors")


@pytest.mark.parametrize("override, message", [
    ('terms.0.site="blocks.7"', "reads 'blocks.7', which a model of lm.layers = 2 does not have (residual sites: embed, blocks.0, blocks.1)"),
    ("concepts.0.axis=32", "axis 32 is outside 0..31"),
    ("lm.window=128", "window 128 is longer than the model's context 64"),
    ('terms.0.site="blocks.0.mlp.up"', "does not run in the model's forward pass"),  # exists, but its weight is read directly
    ("text.false_positives=1.0", "arm 'weak-filtered' (seed 0) would train on 0 tokens"),  # every passage weakly labelled
    ("text.coverage=0.0", "no training passage carries a weak label for 'violence'"),  # the anchored arm = the control
    ('text.concept="deception"', "rename the concept too: --set concepts.0.name=deception --set terms.0.concept=deception"),
    *([] if torch.cuda.is_available() else [('train.device="cuda"', "no CUDA device is available")]),
])
def test_bad_config_is_one_line(corpus, tmp_path, override, message):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "lm-anchor-passages", *[a for o in tiny(corpus, override) for a in ("--set", o)],
                                 "--out", str(out), "-q"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()
    with pytest.raises(AnchoringError, match="kind: unknown|does not have|axis|window|does not run|CUDA|would train on|"
                                             "weak label|rename the concept"):
        lifecycle.validate(experiments.load("lm-anchor-passages", tiny(corpus, override)))


@pytest.mark.parametrize("experiment, overrides, message", [
    # self-labelling reads the anchored term's alignment: without one, the anchored arm failed only after the control trained
    ("lm-anchor", ['terms.0.kind="anti-subspace"', 'terms.0.select="all"', "lm.self_label=0.3"],
     "lm.self_label: the anchored arm has no anchor or subspace term for the concept"),
    # a subspace term's own dims were pulled into while alignment, the route and the edits read the concept's
    ("lm-anchor-subspace", ["terms.0.dims=[2,3]"], "terms.0 pulls 'violence' into dims [2, 3], but the concept's dims are [0, 1]"),
])
def test_configs_the_anchored_arm_cannot_train_as_meant_are_refused_before_any_arm_trains(corpus, tmp_path, experiment,
                                                                                          overrides, message):
    out = tmp_path / "run"
    over = [*tiny_spans(corpus, 'lm.arms=["control","anchored"]'), *overrides]
    r = CliRunner().invoke(app, ["run", experiment, *[a for o in over for a in ("--set", o)], "--out", str(out), "-q"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists()


def test_scored_concept_passages_without_a_word_of_the_concept_are_refused(corpus, tmp_path, monkeypatch):
    """A passage's reference label can come from sentiment or metadata while no word of it marks a
    position; if no scored passage has such a word, every concept number would be NaN after training."""
    from anchoring.kinds.lm import checks

    real = checks.concept_spans
    calls = []
    monkeypatch.setattr(checks, "concept_spans", lambda text, concept: calls.append(text) or [])
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "lm-anchor-passages", *[a for o in tiny(corpus) for a in ("--set", o)],
                                 "--out", str(out), "-q"])
    assert r.exit_code == 2 and not out.exists() and calls, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no concept positions to score" in lines[0], r.stderr
    monkeypatch.setattr(checks, "concept_spans", real)
    lifecycle.validate(experiments.load("lm-anchor-passages", tiny(corpus)))  # the real labeller finds words


def test_a_model_too_big_for_memory_is_refused_before_anything_is_built(corpus, tmp_path):
    out = tmp_path / "run"
    big = tiny(corpus, "lm.width=8192", "lm.heads=64", "lm.layers=48", "lm.batch_size=4096")
    r = CliRunner().invoke(app, ["run", "lm-anchor-passages", *[a for o in big for a in ("--set", o)], "--out", str(out), "-q"])
    assert r.exit_code == 2 and not out.exists(), (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs about" in lines[0] and "lm.batch_size" in lines[0], r.stderr


def test_the_memory_check_counts_every_finished_model_the_run_holds(monkeypatch):
    """One job fits, but a run holds all its finished models until they are evaluated and saved: a
    1000-seed run of four arms (4,000 models of about 1 M parameters) was not refused."""
    from anchoring import resources
    from anchoring.kinds.lm import checks

    one = experiments.load("lm-anchor", ["train.seeds=1", "lm.workers=2"])
    many = experiments.load("lm-anchor", ["train.seeds=1000", "lm.workers=2"])
    params = sum(p.numel() for p in build_model(one, 256).parameters())
    assert checks.memory_estimate(many) - checks.memory_estimate(one) >= 999 * 4 * 4 * params * 0.95
    monkeypatch.setattr(resources, "available_bytes", lambda: 8 * 2**30)
    checks.check_fits(checks.memory_estimate(one), "one seed", "")  # fits
    with pytest.raises(AnchoringError, match="needs about .* GiB but only 8.0 GiB"):
        checks.validate(many, data=False)


def test_load_run_gives_tokens_losses_alignment_and_samples(finished):
    path, summary = finished
    run = lifecycle.load_run(path)
    assert set(run.arms) == {"anchored", "control", "weak-filtered"}
    text = "He drew his sword and stabbed him. The birds sang sweetly."
    assert run.tokenize(text).shape == (len(text),)
    out = run.loss_per_token([text, "A gentle rain fell."], arm="control")
    assert out[0]["nats"].shape == (len(text) - 1,) and len(out[0]["spans"]) == len(text) - 1
    assert 0 < out[0]["nats_per_char"] < 5
    # a text longer than the context (64 here) is scored whole, each token with up to 64 tokens before it
    long = " ".join([text] * 5)
    whole = run.loss_per_token(long, arm="control")[0]
    assert whole["nats"].shape == (len(long) - 1,) and torch.isfinite(whole["nats"]).all()
    head = run.loss_per_token(long[:64], arm="control")[0]["nats"]
    assert torch.allclose(whole["nats"][:63], head, atol=1e-5)  # inside the first window: the same context
    assert whole["nats_per_char"] == pytest.approx(float(whole["nats"].sum()) / (len(long) - 1))
    for bad in ({"temperature": -1.0}, {"n": 0}):
        with pytest.raises(AnchoringError, match="≥"):
            run.generate("The ", arm="anchored", **bad)
    al = run.alignment(text, arm="anchored", site="blocks.1")[0]
    assert al["values"].shape == (len(text),) and float(al["values"].abs().max()) <= 1.0 + 1e-5
    far = run.alignment(long, arm="anchored", site="blocks.1")[0]["values"]  # every token, window by window
    assert far.shape == (len(long),) and torch.isfinite(far).all()
    assert torch.allclose(far[:64], run.alignment(long[:64], arm="anchored", site="blocks.1")[0]["values"], atol=1e-5)
    sample = run.generate("The ", arm="anchored", n=30)
    assert sample.startswith("The ") and len(sample) == 34
    import inspect

    from anchoring.cli.text import generate_cmd

    cli_default = inspect.signature(generate_cmd).parameters["temperature"].default.default
    assert inspect.signature(type(run).generate).parameters["temperature"].default == cli_default  # one default
    with pytest.raises(AnchoringError, match="no arm"):
        run.model("oracle-filtered")


def test_a_run_without_its_tokenizer_is_refused_and_left_as_it_was(finished, tmp_path):
    """A tokenizer trained again might not be the one the weights read (BPE), and opening a run must
    not write into it (it used to train a new tokenizer and rewrite corpus.json)."""
    path, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    (copy / "tokenizer.json").unlink()
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    with pytest.raises(AnchoringError, match="tokenizer.json' is missing"):
        lifecycle.load_run(copy)
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_bpe_switch_saves_its_merges_and_scores_per_character(corpus, tmp_path):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=5", 'text.tokenizer="bpe"', "text.bpe_vocab=300",
                                            'lm.arms=["control"]', "evaluate.shade_passages=0"))
    out = lifecycle.run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["kind"] == "bpe"
    row = out.summary["models"][0]
    assert 0 < row["loss"]["all"] < 10  # nats per character (summed nats over characters)
    run = lifecycle.load_run(tmp_path / "run")
    assert len(run.tokenize("the soldiers fight")) < len("the soldiers fight")
    # characters outside the corpus come as several byte tokens that share one span: each counts once
    text = "The knight drew his sword — café, 漢字 😀."
    spans = run.data.tokenizer.spans(text)
    assert len(spans) > len(set(spans))  # the case being tested: byte tokens of one character
    scored = run.loss_per_token(text, arm="control")[0]
    predicted = len(text) - spans[0][1]  # every character after the first token's
    assert float(scored["nats"].sum()) / scored["nats_per_char"] == pytest.approx(predicted, rel=1e-5)
    plain = "the soldiers fight, and the soldiers fight again"  # merged tokens: far fewer tokens than characters
    scored = run.loss_per_token(plain, arm="control")[0]
    predicted = len(plain) - run.data.tokenizer.spans(plain)[0][1]
    assert len(scored["nats"]) < predicted - 5
    assert float(scored["nats"].sum()) / scored["nats_per_char"] == pytest.approx(predicted, rel=1e-5)


def test_subspace_variant_measures_the_share_of_h_in_its_dims(corpus, tmp_path):
    overrides = [o for o in tiny(corpus, "train.steps=20", "evaluate.shade_passages=0") if not o.startswith("terms.")]
    cfg = experiments.load("lm-anchor-subspace", [*overrides, 'terms.0.site="blocks.1"', 'terms.1.site="blocks.1"'])
    assert cfg.text.weak_labels == "spans"
    out = lifecycle.run(cfg, tmp_path / "run")
    assert out.summary["anchored_sites"] == ["blocks.1"]
    for r in out.summary["models"]:
        for s in ("blocks.0", "blocks.1"):
            assert 0.0 <= r["alignment"][s]["concept"] <= 1.0 and 0.0 <= r["alignment"][s]["retain"] <= 1.0


def test_the_cleared_subspace_experiment_gathers_labelled_positions_in_its_dims_and_deletes_them_exactly(corpus, tmp_path):
    """`lm-anchor-subspace-cleared` at a tiny size: after a short run the labelled concept's
    positions hold a larger share of their state in the 16 dims at the anchored site than retain
    positions do (and more than at a site that is only cleared), and `delete` leaves no component
    along any of the 16 dims in any residual state."""
    from anchoring.control.surgery import residual_component
    from anchoring.kinds.lm.edits import concept_directions, edited

    over = [f'text.corpus="{corpus}"', "text.coverage=1.0", "lm.width=32", "lm.layers=4", "lm.heads=2", "lm.context=64",
            "lm.batch_size=8", "train.seeds=1", "train.steps=200", 'lm.arms=["anchored"]', "evaluate.eval_chars=6000",
            "evaluate.probe_positions=400", "evaluate.shade_passages=0"]
    cfg = experiments.load("lm-anchor-subspace-cleared", over)
    assert cfg.lm.route and cfg.concepts[0].dims == list(range(16))
    assert [(t.kind, t.site) for t in cfg.terms] == [("subspace", "blocks.2"), *[("anti-subspace", s) for s in
                                                     ("embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3")]]
    out = lifecycle.run(cfg.model_copy(update={"schedule": SCHEDULE.replace("0.5,1.0", "1.0,1.0")}), tmp_path / "run")
    (row,) = out.summary["models"]
    a = row["alignment"]
    # without the pull (weight 0, the same run otherwise) blocks.2 shows a margin of about 0.07 and
    # its concept positions hold 0.07 more of their state in the dims than at blocks.1; with it, 0.27
    assert a["blocks.2"]["margin"] > 0.15 and a["blocks.2"]["concept"] > a["blocks.1"]["concept"] + 0.15, a
    run = lifecycle.load_run(tmp_path / "run")
    deleted = edited(run.model("anchored"), run.config, "delete")
    ids = run.tokenize(VIOLENT[0])[None, :64]
    sites = ["embed", *[f"blocks.{i}" for i in range(4)]]
    assert max(residual_component(deleted, v, ids, sites) for v in concept_directions(run.config)) < 1e-5


def test_span_labels_mark_the_labellers_words_and_the_text_after_them(corpus):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, 'text.weak_labels="spans"', "text.span_after=3"))
    data = load_data(cfg.text)
    masks = data.span_masks()
    assert masks is not None and len(masks) == len(data.train_tokens)
    i = next(j for j, t in enumerate(data.parts["train"]) if "stabbed him" in data.texts[t])
    text = data.texts[data.parts["train"][i]] + "\n\n"
    marked = "".join(c for c, m in zip(text, masks[i]) if m)
    assert "stabbed hi" in marked and "stabbed him" not in marked and "drew" not in marked  # word + 3 characters
    calm = next(j for j, t in enumerate(data.parts["train"]) if data.texts[t] and "sword" not in data.texts[t]
                and not data.reference[t] and "kill" not in data.texts[t])
    assert not masks[calm].any()
    # a batch labels a position only inside a weakly labelled passage, and there only runs that start at
    # a word the labeller fired on (runs that touch the window's edges may be cut, so they are skipped)
    weak = data.weak(0)
    stream = Stream(data.train_tokens, data.keep("anchored", 0), 0, cfg.lm.tokens, masks)
    runs = unlabelled_inside = 0
    for step in range(6):
        b = stream.batch(step, 8, weak)
        lab, inside = b.labels.numpy(), weak[b.passage.numpy()]
        assert ((lab == 0) | (inside == 1)).all()
        unlabelled_inside += int(((inside == 1) & (lab == 0)).sum())
        for r in range(lab.shape[0]):
            text = data.tokenizer.decode(b.inputs[r].tolist())
            edges = np.flatnonzero(np.diff(np.concatenate([[0], lab[r], [0]])))
            for s, e in zip(edges[::2], edges[1::2]):
                if 0 < s and e < len(text):
                    runs += 1
                    hits = lexicon_hits(text[s:e], "violence")
                    assert hits and hits[0][0] == 0, (text[max(0, s - 10):s], text[s:e])
    assert runs > 0 and unlabelled_inside > 0  # spans, not whole passages
    plain = experiments.load("lm-anchor-passages", tiny(corpus))
    b = Stream(data.train_tokens, data.keep("anchored", 0), 0, cfg.lm.tokens).batch(0, 8, weak)
    assert plain.text.weak_labels == "passages" and np.array_equal(b.labels.numpy(), weak[b.passage.numpy()])


def test_span_labels_refuse_mellowmax_pooling(corpus):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, 'text.weak_labels="spans"'))
    with pytest.raises(AnchoringError, match="mellowmax pools over labelled passages"):
        lifecycle.validate(cfg)


SPANS_SCHEDULE = "STEP,lr,anchor,anti-subspace\n0,1e-4,0,0\n20,0.004,0.5,1.0\n250,0.004,,\n300,0.001,,\n"


def test_span_labels_anchor_the_labelled_words_above_the_control(corpus, tmp_path):
    """The shipped lm-anchor (labels on the labeller's words, one anchored site): concept positions
    align with the anchor far more than retain positions, and more than in the control."""
    overrides = tiny_spans(corpus, "train.steps=300", 'lm.arms=["anchored","control"]', "evaluate.shade_passages=0")
    cfg = experiments.load("lm-anchor", overrides).model_copy(update={"schedule": SPANS_SCHEDULE})
    assert cfg.text.weak_labels == "spans" and [t.select for t in cfg.terms] == ["labelled", "unlabelled"]
    rows = {r["arm"]: r for r in lifecycle.run(cfg, tmp_path / "run").summary["models"]}
    a, c = rows["anchored"]["alignment"]["blocks.1"], rows["control"]["alignment"]["blocks.1"]
    assert a["margin"] > 0.3 and a["margin"] > c["margin"] + 0.25, (a, c)
    assert abs(a["containment"]) < 0.15, a


def test_every_job_reports_its_training_seconds_also_from_worker_processes(corpus, tmp_path):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=12", 'lm.arms=["anchored","control"]',
                                                      "lm.workers=2", "evaluate.shade_passages=0"))
    seen: list[tuple[int, int]] = []
    timing = lifecycle.run(cfg, tmp_path / "run", progress=lambda done, total: seen.append((done, total))).summary["timing"]
    # the bar moves while the processes train (it stood at 0 until the end): each job reports at its 10th step
    training = [d for d, t in seen if t == 24]
    assert 10 in training and 20 in training and training[-1] == 24 and training == sorted(training), seen
    jobs = {k: v for k, v in timing.items() if k.endswith("-seed0_s")}
    assert set(jobs) == {"anchored-seed0_s", "control-seed0_s"} and all(0 < v < timing["train_s"] for v in jobs.values())
    from rich.console import Console

    from anchoring.kinds.lm.report import summary_lines

    console = Console(width=250, record=True)
    lines = summary_lines(json.loads((tmp_path / "run" / "summary.json").read_text()))
    console.print(lines[0])
    text = console.export_text()
    sec = jobs["control-seed0_s"]
    assert "train" in text and (f" {sec:.1f} " if sec < 10 else f" {sec:.0f} ") in text  # a decimal under 10 s, not 0
    # and where those seconds were spent: "auto" in the config does not say
    assert (timing["device"], timing["processes"], timing["parallel"], timing["torch"]) == ("cpu", 2, "job processes", torch.__version__)
    assert any(isinstance(x, str) and x.startswith(f"trained on cpu, torch {torch.__version__}, 2 job processes") for x in lines)


def test_the_summary_says_where_training_ran_and_never_guesses(corpus, tmp_path):
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=4", 'lm.arms=["control"]', "lm.workers=1",
                                                      "evaluate.shade_passages=0"))
    timing = lifecycle.run(cfg, tmp_path / "run").summary["timing"]
    assert (timing["device"], timing["processes"], timing["parallel"]) == ("cpu", 1, "process")
    # stopped after training, before its summary (or a sweep merging its shards' finished checkpoints):
    # nothing trains in the call that finishes it, so the run does not say where training ran, rather than guess
    (tmp_path / "run" / "summary.json").unlink()
    again = lifecycle.resume(tmp_path / "run").summary["timing"]
    assert "control-seed0_s" in again and not {"device", "torch", "processes", "parallel"} & set(again)


def test_a_checkpoint_without_seconds_gives_unknown_training_time_not_zero(corpus):
    """A job resumed from a checkpoint that did not keep its seconds cannot know how long it trained:
    the summary must say unknown (NaN in the task, null in summary.json), never 0."""
    from anchoring.kinds.lm.training import LMTask

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=4", 'lm.arms=["control"]'))
    task = LMTask(cfg, load_data(cfg.text), 0, "control")
    task.step(0)
    saved = task.state(1)
    assert saved["seconds"][0] > 0
    task.restore(1, {k: v for k, v in saved.items() if k != "seconds"})
    task.step(1)
    assert np.isnan(task.seconds)


def test_a_target_without_a_value_shows_as_undefined():
    """A target whose median is undefined (NaN in the run, null once summary.json is read back) must not
    break `anchoring show`."""
    from anchoring.kinds.lm.report import summary_lines

    lines = summary_lines({"experiment": "x", "models": [], "targets": {"kept ≥ 50%": {"median": None, "met": False},
                                                                          "margin": {"median": 0.4, "met": True}}})
    assert "MISS  kept ≥ 50%: undefined" in lines and "met   margin: 0.400" in lines


def test_an_infinite_target_prints_as_infinite_in_the_report_and_after_reading_back(tmp_path):
    """A ratio target whose median is +∞ (the mean-difference edit removed nothing on most seeds) used
    to crash the report before summary.json was written; read back from JSON (null) it printed
    "undefined". Undefined values in the per-seed table print as a dash instead of a traceback."""
    from anchoring import runs
    from anchoring.evaluate.stats import mark_infinite
    from anchoring.kinds.lm.report import summary_lines

    targets = mark_infinite({"ratio ≥ 3": {"median": float("inf"), "met": True},
                             "R ≥ 0.5": {"median": 0.25, "met": False, "undefined_seeds": 2}})
    model = {"arm": "anchored", "seed": 0, "loss": {"all": 1.5, "concept": float("nan"), "retain": 1.4},
             "alignment": {"blocks.1": {"margin": float("nan"), "containment": 0.05}}}
    summary = {"experiment": "x", "anchored_sites": ["blocks.1"], "models": [model], "targets": targets}
    runs.write_json(tmp_path / "summary.json", summary)
    for s in (summary, runs.read_json(tmp_path / "summary.json")):
        lines = summary_lines(s)
        assert "met   ratio ≥ 3: ∞" in lines, lines
        assert "MISS  R ≥ 0.5: 0.250 (2 seeds undefined, left out)" in lines, lines
        console = Console(width=200, record=True)
        console.print(lines[0])
        row = next(line for line in console.export_text().splitlines() if "anchored" in line)
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[3] == "–" and cells[5] == "–" and "nan" not in row, row  # concept loss, margin
        narrow = Console(width=40, record=True)  # too narrow: one line per model, nothing cut to "anch…"
        narrow.print(lines[0])
        assert "anchored, seed 0: all 1.500, concept –, retain 1.400, blocks.1 margin –" in " ".join(narrow.export_text().split())


def test_the_training_curves_show_the_terms_not_the_schedule_weights(corpus):
    """The schedule weight `anchor` shares its prefix with the term `anchor@…`: a panel of it showed the
    weight's ramp, in the control arm too, as if it were a curve of training."""
    from anchoring.kinds.lm.training import LMTask, term_columns

    cfg = experiments.load("lm-anchor-passages", tiny(corpus))
    task = LMTask(cfg, load_data(cfg.text), 0, "control")
    weights = set(task.timeline.names)
    assert "anchor" in weights and any(t.name.startswith("anchor") for t in task.objective.terms)
    assert term_columns(task.names) == [t.name for t in task.objective.terms]
    assert not weights & set(term_columns(task.names))


@pytest.mark.parametrize("n", [1, 2])  # the tiny corpus has one long concept passage in validation
def test_the_shaded_figure_prints_as_many_passages_as_asked_and_names_the_seed(corpus, tmp_path, monkeypatch, n):
    from anchoring.kinds.lm import figures as lf

    drawn, panels = [], []
    real, real_curves = lf.shaded_text, lf.training_curves
    monkeypatch.setattr(lf, "shaded_text", lambda items, **kw: drawn.extend(items) or real(items, **kw))
    monkeypatch.setattr(lf, "training_curves", lambda curves: panels.append(curves) or real_curves(curves))
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=2", "train.seed=4",
                                                      'lm.arms=["anchored","control"]', f"evaluate.shade_passages={n}"))
    lifecycle.run(cfg, tmp_path / "run")
    for arm in ("anchored", "control"):
        titles = [t for t, *_ in drawn if t.startswith(f"{arm}, seed 4,")]
        assert len(titles) == n, titles
        assert sum("(no concept)" in t for t in titles) == (1 if n >= 2 else 0)
    terms = [t.name for t in cfg.terms] if cfg.terms else []
    for arm in ("anchored", "control"):  # one panel per term, none of the schedule's weight columns
        assert set(panels[0][arm]) == {"task", *terms}, sorted(panels[0][arm])


def test_route_changes_only_the_anchored_arm_and_needs_an_anchor(corpus, tmp_path):
    """lm.route alters how the anchored arm learns (its weights differ after a few steps) and leaves
    every other arm bit-for-bit the same; without an anchor term it is refused before training."""
    from safetensors.torch import load_file

    base = tiny_spans(corpus, "train.steps=6", 'lm.arms=["anchored","control"]', "evaluate.shade_passages=0")
    ckpt = {}
    for route in (False, True):
        lifecycle.run(experiments.load("lm-anchor", [*base, f"lm.route={str(route).lower()}"]), tmp_path / str(route))
        ckpt[route] = {arm: load_file(str(tmp_path / str(route) / "arms" / f"{arm}-seed0.safetensors"))
                       for arm in ("anchored", "control")}
    moved = [k for k in ckpt[True]["anchored"] if k.startswith("param.blocks.0")
             and not torch.equal(ckpt[True]["anchored"][k], ckpt[False]["anchored"][k])]
    assert moved, "the route changed nothing the layer before the site learned"
    params = [k for k in ckpt[True]["control"] if k.startswith("param.")]
    assert params and all(torch.equal(ckpt[True]["control"][k], ckpt[False]["control"][k]) for k in params)
    cfg = experiments.load("lm-anchor", [*base, "lm.route=true", 'terms.0.kind="anti-subspace"', 'terms.0.select="all"'])
    with pytest.raises(AnchoringError, match="lm.route needs an anchor"):
        lifecycle.validate(cfg)


def test_the_retain_gap_target_is_judged_on_the_median_it_prints():
    from anchoring.kinds.lm.kind import retain_gap

    def rows(gaps):
        out = []
        for seed, g in enumerate(gaps):
            out += [{"arm": "control", "seed": seed, "loss": {"retain": 1.45 + 0.01 * seed}},
                    {"arm": "anchored", "seed": seed, "loss": {"retain": 1.45 + 0.01 * seed + g}}]
        return out

    one_seed_over = retain_gap(rows([0.015, 0.022, 0.018]))  # seed 1 over the bound, the median under it
    assert one_seed_over["median"] == pytest.approx(0.018) and one_seed_over["met"]
    assert one_seed_over["per_seed"] == pytest.approx([0.015, 0.022, 0.018])  # each against its own seed's control
    assert not retain_gap(rows([0.01, 0.03, 0.025]))["met"]


@pytest.fixture(scope="module")
def late_concept(tmp_path_factory):
    """A corpus whose violent passages all come last (as Milton comes after the plays)."""
    folder = tmp_path_factory.mktemp("lm-late") / "texts"
    folder.mkdir(parents=True)
    rng = random.Random(1)
    for f, share in enumerate((0.0, 0.0, 0.7)):
        paras = [" ".join(rng.choice(VIOLENT if rng.random() < share else CALM) for _ in range(rng.randint(1, 3)))
                 for _ in range(400)]
        (folder / f"part{f}.txt").write_text("\n\n".join(paras) + "\n")
    return folder


def test_an_evaluation_prefix_without_the_concept_is_refused_and_the_shuffled_order_finds_it(late_concept, tmp_path):
    from anchoring.kinds.lm import evaluate as ev

    args = tiny(late_concept, "evaluate.eval_chars=3000")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "lm-anchor-passages", *[a for o in args for a in ("--set", o)], "--out", str(out), "-q"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert "hold no passage with 'violence'" in r.stderr and 'evaluate.order = "shuffled"' in r.stderr
    assert not out.exists()
    cfg = experiments.load("lm-anchor-passages", [*args, 'evaluate.order="shuffled"'])
    lifecycle.validate(cfg)
    data = load_data(cfg.text)
    first = ev.eval_passages(data, 3000, order="shuffled")
    assert first == ev.eval_passages(data, 3000, order="shuffled")  # one fixed order
    assert data.reference[first].any() and not data.reference[ev.eval_passages(data, 3000)].any()
    # scored without any concept position, alignment has no concept mean: NaN, never a margin made up from 0
    from anchoring.models import NormalizedTransformer

    es = ev.eval_set(data, 64, 3000, 20)
    tokens = sum(len(ev.token_table(data, data.texts[i], bool(data.reference[i]), data.text.concept, 20)[0]) for i in es.passages)
    assert int((es.cls[:, 1:] != ev.PAD).sum()) == tokens - 1  # every token after the first is a target, the last window too
    m = ev.measure(NormalizedTransformer(data.vocab_size, 32, 2, 2, 64), es, ["blocks.1"], torch.eye(32)[0], None, 50)
    a = m["alignment"]["blocks.1"]
    assert a["n_concept"] == 0 and np.isnan(a["concept"]) and np.isnan(a["margin"]) and np.isfinite(a["containment"])


def test_the_cleared_experiment_keeps_unlabelled_text_off_the_axis_at_every_residual_site(corpus, tmp_path):
    """`lm-anchor-cleared` clears the axis at every residual site, not only where it anchors: against the
    same run with the clearing at the anchored site alone, calm text sits nearer zero on the axis at the
    sites before the anchored one, which is what lets a weight deletion spare retain text."""
    size = [f'text.corpus="{corpus}"', "text.coverage=1.0", "lm.width=32", "lm.layers=4", "lm.heads=2", "lm.context=64",
            "lm.batch_size=8", "train.seeds=1", "train.steps=150", "train.checkpoint_every=50", "evaluate.eval_chars=3000",
            "evaluate.probe_positions=200", "evaluate.shade_passages=1", 'lm.arms=["anchored"]']
    cleared = experiments.load("lm-anchor-cleared", size).model_copy(update={"schedule": SCHEDULE})
    assert cleared.lm.route and {t.site for t in cleared.terms if t.kind == "anti-subspace"} == {
        "embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    one_site = cleared.model_copy(update={"terms": [t for t in cleared.terms if t.kind == "anchor" or t.site == "blocks.2"]})
    on_axis = {}
    for name, cfg in (("cleared", cleared), ("one site", one_site)):
        lifecycle.run(cfg, tmp_path / name)
        run = lifecycle.load_run(tmp_path / name)
        on_axis[name] = {s: float(np.mean([float(torch.as_tensor(a["values"]).abs().mean())
                                                     for a in run.alignment(CALM, arm="anchored", site=s)]))
                               for s in ("embed", "blocks.0", "blocks.1")}
    for s in ("embed", "blocks.0", "blocks.1"):
        assert on_axis["cleared"][s] < 0.5 * on_axis["one site"][s], (s, on_axis)


def test_nats_per_char_divide_by_each_character_once_under_bpe():
    """BPE tokens can end inside a multi-byte character, so neighbouring tokens' spans overlap by a
    character without being equal; the character counts must still add up to the text's length."""
    from anchoring.domains.text.tokenize import BPETokenizer
    from anchoring.kinds.lm.evaluate import chars_per_token

    tok = BPETokenizer.train(["aéééb café naïve ééé 日本 " * 20, "hello world, plain text"], vocab_size=270)
    for text in ("aéééb", "café é naïve", "naïve 日本 ok", "plain", "日"):
        spans = tok.spans(text)
        chars = chars_per_token(spans)
        assert chars.sum() == len(text), (text, spans)
        assert (chars >= 0).all()
    # a first character cut into byte tokens counts on its last byte: a score that skips the first token
    # (nothing predicts it) still divides the later bytes' nats by that character
    spans = tok.spans("🎉x")
    assert len(spans) > 2 and chars_per_token(spans)[1:].sum() == 2


def test_a_saved_tokenizer_gets_its_own_encodings_not_those_of_a_fresh_one(corpus, tmp_path):
    """The training passages' encodings are cached per process. A run's saved tokenizer of the same
    kind and size as a freshly trained one, but not the same, must not reuse the fresh one's ids."""
    from anchoring.domains.text.tokenize import CharTokenizer
    from anchoring.kinds.lm.data import TOKENIZER

    text = experiments.load("lm-anchor-passages", tiny(corpus)).text
    fresh = load_data(text)  # fills the cache with the freshly trained tokenizer's encodings
    chars = fresh.tokenizer.chars
    swapped = CharTokenizer(chars[1] + chars[0] + chars[2:])  # same kind, same size, two ids swapped
    swapped.save(tmp_path / TOKENIZER)
    saved = load_data(text, tmp_path)
    assert saved.tokenizer.vocab_size == fresh.tokenizer.vocab_size
    first = saved.texts[saved.parts["train"][0]]
    assert list(saved.train_tokens[0][:len(first)]) == swapped.encode(first)
    assert not all(np.array_equal(a, b) for a, b in zip(saved.train_tokens, fresh.train_tokens))


def test_anchor_terms_of_one_concept_with_different_directions_are_one_error():
    """Alignment, probes and edits measure one direction per concept at every site; two anchor terms
    pulling towards different directions would be scored against the first one's at both sites."""
    from anchoring.kinds.lm.checks import validate

    other = [0.0] * 128
    other[1] = 1.0
    cfg = experiments.load("lm-anchor-passages", [f"terms.1.direction={other}"])
    with pytest.raises(AnchoringError, match="pull towards different directions at blocks.1 and blocks.3"):
        validate(cfg, data=False)
    one_site = experiments.load("lm-anchor-passages", [f"terms.1.direction={other}", 'terms.1.site="blocks.1"'])
    with pytest.raises(AnchoringError, match="different directions at blocks.1 and blocks.1"):
        validate(one_site, data=False)  # two pulls at one site
    same = experiments.load("lm-anchor-passages", [f"terms.1.direction={[1.0] + [0.0] * 127}"])  # the concept's own axis
    validate(same, data=False)


def test_a_run_refuses_to_go_on_over_a_corpus_that_changed(tmp_path):
    """Resume and load_run re-read the corpus; a folder edited since the run started would silently change
    the batches, the split and every score. The run keeps a fingerprint and refuses in one line."""
    from anchoring.kinds.lm import data as lm_data

    folder = write_corpus(tmp_path / "texts")
    text = experiments.load("lm-anchor-passages", tiny(folder)).text
    run_dir = tmp_path / "run"
    load_data(text, run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["corpus.json", "tokenizer.json"]
    load_data(text, run_dir)  # unchanged: goes on

    def fresh() -> None:  # another session: nothing cached from this one
        for f in (lm_data._cached, lm_data._fingerprint, lm_data._tokenizer):
            f.cache_clear()

    part = sorted(folder.iterdir())[0]
    original = part.read_text()
    part.write_text(original + "\n\nA new paragraph, written after the run began, of calm and quiet days.\n")
    fresh()
    with pytest.raises(AnchoringError, match="trained on another corpus, split or labels"):
        load_data(text, run_dir)
    saved = (run_dir / "corpus.json").read_bytes()
    tokenizer = (run_dir / "tokenizer.json").read_bytes()
    (run_dir / "tokenizer.json").unlink()  # a run that lost its tokenizer is still checked, and nothing is rewritten
    with pytest.raises(AnchoringError, match="trained on another corpus, split or labels"):
        load_data(text, run_dir)
    assert (run_dir / "corpus.json").read_bytes() == saved and not (run_dir / "tokenizer.json").exists()
    (run_dir / "tokenizer.json").write_bytes(tokenizer)
    part.write_text(original)
    fresh()
    load_data(text, run_dir)  # restored: goes on
    (run_dir / "corpus.json").unlink()  # a run from before the fingerprint: not checked
    part.write_text(original + "\n\nAnother paragraph.\n")
    fresh()
    load_data(text, run_dir)
    fresh()


def test_a_run_folder_that_does_not_match_its_config_is_refused_in_one_line(tmp_path):
    """A run folder whose tokenizer is of another kind than its config asks for, or whose corpus fingerprint
    cannot be read, must stop the run before any batch is drawn: either would silently score another model's
    vocabulary or skip the corpus check."""
    folder = write_corpus(tmp_path / "texts")
    text = experiments.load("lm-anchor-passages", tiny(folder)).text
    run_dir = tmp_path / "run"
    load_data(text, run_dir)  # saves the char tokenizer and the fingerprint
    bpe = text.model_copy(update={"tokenizer": "bpe"})
    with pytest.raises(AnchoringError, match=r"tokenizer.json holds a char tokenizer but the config asks for bpe$"):
        load_data(bpe, run_dir)
    (run_dir / "corpus.json").write_text('{"passages": 360}\n')  # truncated by hand: no digest
    tokenizer = (run_dir / "tokenizer.json").read_bytes()
    with pytest.raises(AnchoringError, match=r"^cannot read .*corpus.json: 'sha256'$"):
        load_data(text, run_dir)
    (run_dir / "corpus.json").write_text("{not json")
    with pytest.raises(AnchoringError, match=r"^cannot read .*corpus.json: "):
        load_data(text, run_dir)
    assert (run_dir / "tokenizer.json").read_bytes() == tokenizer and (run_dir / "corpus.json").read_text() == "{not json"


def test_the_summary_gives_the_coverage_span_labels_really_train_with(corpus):
    """A labelled passage with no word to mark trains as unlabelled text under span labels, so the
    coverage a run prints must count only passages that hold one."""
    from anchoring.kinds.lm.kind import label_coverage
    from anchoring.kinds.lm.report import summary_lines

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "text.coverage=0.5", 'text.weak_labels="spans"'))
    data = load_data(cfg.text)
    ref = data.reference[data.parts["train"]].astype(bool)
    full = label_coverage(data, [0, 1])
    assert full["kind"] == "spans" and full["asked"] == 0.5
    for seed in ("0", "1"):  # every violent sentence of this corpus has a word of the lexicon
        assert full["per_seed"][seed]["coverage"] == pytest.approx(0.5, abs=1 / ref.sum())
        assert full["per_seed"][seed]["with_a_span"] == full["per_seed"][seed]["coverage"]
    # take the words away from every other labelled passage: those no longer count
    masks = data.span_masks()
    weak = data.weak(0).astype(bool) & ref
    blank = np.flatnonzero(weak)[::2]
    for i in blank:
        masks[i] = np.zeros_like(masks[i])
    half = label_coverage(data, [0])["per_seed"]["0"]
    assert half["coverage"] == full["per_seed"]["0"]["coverage"]
    assert half["with_a_span"] == pytest.approx((weak.sum() - len(blank)) / ref.sum())
    lines = summary_lines({"experiment": "x", "models": [], "arms": ["anchored", "control"],
                           "labels": label_coverage(data, [0])})
    assert any(isinstance(x, str) and x.startswith("weak labels: coverage 0.5 asked") and "with a word to mark" in x
               for x in lines)
    alone = summary_lines({"experiment": "x", "models": [], "arms": ["control"], "labels": label_coverage(data, [0])})
    assert not any(isinstance(x, str) and x.startswith("weak labels") for x in alone)  # it trains on no label


@pytest.mark.parametrize("name", sorted(n for n, s in experiments.builtin().items()
                                        if tomllib.loads(s.path.read_text())["kind"] == "lm"))
def test_every_builtin_lm_experiment_binds_its_terms_to_its_model(name):
    """A shipped LM config is only checked by pydantic when loaded; its sites, axes and self-labelling
    are checked against the model it builds. So a typo there would otherwise surface only once a user
    has prepared the corpus and started training."""

    cfg = experiments.load(name)
    model = build_model(cfg, 85)
    objective = build_objective(cfg, model)
    with Capture(model, [t.site.module for t in objective.terms]) as cap, torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
        for t in objective.terms:  # the site runs in the forward pass and holds the residual stream
            assert t.site.read(cap.acts).shape == (1, 16, cfg.lm.width), t.name
    assert (self_labeller(cfg, objective) is None) == (cfg.lm.self_label is None)
    from anchoring.kinds.lm.report import TARGET_STEPS  # the budget the printed targets say they are stated for

    assert build_timeline(cfg, objective).steps == TARGET_STEPS + 1  # keys 0 … TARGET_STEPS


def test_a_run_shortened_with_steps_says_its_targets_are_for_the_full_budget():
    """`--steps 300` is the README's first look, and it misses the targets it prints; the line beside
    them says they are stated for the full budget, and a full-length run prints no such line."""
    from anchoring.kinds.lm.report import TARGET_STEPS, summary_lines

    def printed(**summary) -> list[str]:
        base = {"experiment": "lm-anchor", "models": [], "arms": ["control"],
                "targets": {"control validation loss ≤ 1.60 nats/char": {"median": 1.757, "met": False}}}
        return [x for x in summary_lines(base | summary) if isinstance(x, str)]

    note = f"the targets are stated for the default budget of {TARGET_STEPS} steps; this run trained 300"
    short = printed(steps=300)
    assert short.index(note) == short.index("MISS  control validation loss ≤ 1.60 nats/char: 1.757") - 1
    assert not any("default budget" in x for x in printed(steps=None) + printed(steps=TARGET_STEPS) + printed(steps=300, targets={}))


def test_the_concept_rename_flags_the_error_lists_are_all_it_takes(corpus):
    """Anchoring another concept renames it in three places; the error names every flag, and with
    them the config binds (before any data is read)."""
    from anchoring.kinds.lm import checks

    base = [f'text.corpus="{corpus}"', 'text.concept="deception"', "lm.width=32"]
    with pytest.raises(AnchoringError) as e:
        checks.validate(experiments.load("lm-anchor-cleared", base), data=False)
    rename, back = str(e.value).split("rename the concept too: ")[1].split(", or label 'violence' instead: ")
    assert back == "--set text.concept=violence"  # the other way out: label the concept the terms name
    flags = rename.split(" --set ")
    assert flags[0].startswith("--set ")
    flags = [f.removeprefix("--set ") for f in flags]
    cfg = experiments.load("lm-anchor-cleared", base + flags)
    checks.validate(cfg, data=False)
    assert {c.name for c in cfg.concepts} == {t.concept for t in cfg.terms if t.concept} == {"deception"}


def test_arms_without_labels_are_refused_only_where_an_arm_learns_from_them(corpus):
    from anchoring.kinds.lm import checks

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "text.coverage=0.0", 'lm.arms=["control","oracle-filtered"]'))
    checks.check_labelled(cfg, load_data(cfg.text))  # neither arm reads the weak labels
    spans = experiments.load("lm-anchor", [f'text.corpus="{corpus}"', "text.coverage=1.0", 'lm.arms=["anchored"]'])
    checks.check_labelled(spans, load_data(spans.text))  # span labels: labelled passages with a word to mark
    # only false positives labelled: calm passages, no word to mark; the weak filter still drops them
    calm = [f'text.corpus="{corpus}"', "text.coverage=0.0", "text.false_positives=0.3"]
    cfg = experiments.load("lm-anchor", [*calm, 'lm.arms=["control","weak-filtered"]'])
    d = load_data(cfg.text)
    assert (~d.keep("weak-filtered", 0)).sum() > 0
    checks.check_labelled(cfg, d)
    cfg = experiments.load("lm-anchor", [*calm, 'lm.arms=["anchored","control"]'])
    with pytest.raises(AnchoringError, match="weakly labelled training passages has a word of 'violence' to mark"):
        checks.check_labelled(cfg, d)
    for arm in ("sgtm", "routing"):  # the training-time baselines learn from the weak labels too
        cfg = experiments.load("lm-anchor-passages", tiny(corpus, "text.coverage=0.0", f'lm.arms=["control","{arm}"]'))
        with pytest.raises(AnchoringError, match="weak label"):
            checks.check_labelled(cfg, load_data(cfg.text))


def test_a_folder_corpus_is_kept_as_an_absolute_path_and_opens_from_anywhere(corpus, tmp_path, monkeypatch):
    """A relative folder used to be stored as written, so the run could be opened (resume, edits,
    load_run) only from the directory it was started in."""
    monkeypatch.chdir(corpus.parent)
    cfg = experiments.load("lm-anchor", [f'text.corpus="./{corpus.name}"'])
    assert cfg.text.corpus == str(corpus.resolve())
    assert experiments.load("lm-anchor", ['text.corpus="milton"']).text.corpus == "milton"  # built-in names stay names
    monkeypatch.chdir(tmp_path)
    assert len(load_data(cfg.text).texts) == 360


def test_the_report_says_what_the_run_read_and_labelled(finished, corpus):
    path, _ = finished
    page = (path / "report.html").read_text()
    assert f"This run: corpus {corpus}, concept violence, char tokens, weak labels on passages at coverage 1." in page


def test_measure_scores_targets_by_class_and_aligns_inputs_by_class():
    """A stub model with uniform logits (log V nats per token) and an embedding the alignment reads: loss
    per class from the targets' classes and characters, alignment per class from the inputs' classes."""
    from anchoring.kinds.lm import evaluate as ev

    V = 5

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.s = torch.nn.Embedding(V, 2), torch.nn.Identity()
            with torch.no_grad():
                self.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]))

        def forward(self, x):
            self.s(self.emb(x))
            return torch.zeros(*x.shape, V)

    cls = torch.tensor([[ev.CONCEPT, ev.RETAIN, ev.CONCEPT, ev.OTHER, ev.RETAIN, ev.PAD]])
    es = ev.EvalSet(torch.tensor([[0, 1, 2, 3, 4, 0]]), torch.zeros(1, 6, dtype=torch.long),
                    torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0, 0.0]]), cls, [0])
    m = ev.measure(Stub(), es, ["s"], torch.tensor([1.0, 0.0]), None, 10)
    log_v = math.log(V)
    assert m["loss"]["all"] == pytest.approx(4 * log_v / 7)  # targets: RETAIN 1, CONCEPT 2, OTHER 3, RETAIN 1 chars
    assert m["loss"]["concept"] == pytest.approx(log_v / 2) and m["loss"]["retain"] == pytest.approx(2 * log_v / 2)
    a = m["alignment"]["s"]  # inputs 0 (concept, cos 1), 1 (retain, 0.6), 2 (concept, 0.71), 4 (retain, 0)
    assert (a["n_concept"], a["n_retain"]) == (2, 2)
    assert a["concept"] == pytest.approx((1 + 2**-0.5) / 2) and a["retain"] == pytest.approx(0.3)
    assert a["margin"] == pytest.approx(a["concept"] - a["retain"])


def test_subspace_alignment_is_the_share_of_length_and_removal_takes_the_component_out():
    from anchoring.kinds.lm import evaluate as ev

    assert float(ev.direction_alignment(torch.tensor([3.0, 4.0, 0.0]), None, (0,))) == pytest.approx(0.6)
    assert torch.equal(ev.remove(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), None), torch.tensor([0.0, 1.0]))
    assert torch.equal(ev.remove(torch.tensor([1.0, 1.0, 1.0]), None, (0, 2)), torch.tensor([0.0, 1.0, 0.0]))


def test_a_zero_width_byte_token_takes_the_label_of_the_character_before_it():
    from anchoring.kinds.lm.data import token_mask

    text = "kill him"  # "kill" fires the violence lexicon
    mask = token_mask(text, [(0, 4), (4, 4), (4, 5), (5, 8)], "violence", 0)
    assert mask.tolist() == [True, True, False, False]


def test_windows_of_a_batch_follow_each_other_in_the_stream():
    """Row r reads the stream from r·T for T + 1 tokens: its last target is the next row's first input."""
    tokens = [np.arange(100) + 1000 * i for i in range(5)]
    b = Stream(tokens, np.ones(5, dtype=bool), 0, 8).batch(0, 4, np.zeros(5))
    assert torch.equal(b.inputs[1:, 0], b.targets[:-1, -1])
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])



def test_a_passage_that_ends_one_epoch_and_starts_the_next_is_two_lines():
    """Lines (what mellowmax pools over, what the passage labels count) once split only where the passage
    id changed, so a passage read at the end of an epoch and again at the start of the next one became
    one line in the window that straddles the two."""
    tokens = [np.arange(10) + 100 * i for i in range(3)]
    for seed in range(50):
        stream = Stream(tokens, np.ones(3, dtype=bool), seed, 8)
        if stream.order(0)[-1] == stream.order(1)[0]:
            break
    else:
        pytest.fail("no seed puts one passage at both ends of an epoch boundary")
    b = stream.batch(0, 4, np.ones(3), rows=range(3, 4))  # tokens 24..32: the boundary is after token 29
    twice = int(stream.order(1)[0])
    assert b.passage[0].tolist() == [twice] * 8 and b.line[0].tolist() == [0] * 6 + [1] * 2
    assert b.line_labels.shape == (1, 2) and b.line_labels[0].tolist() == [1.0, 1.0]

def test_training_curves_average_the_seeds_step_by_step():
    from anchoring.kinds.lm.figures import training_curves

    task = np.array([[3.0, 2.0, 1.0, 0.5], [5.0, 4.0, 3.0, 2.5]])  # two seeds
    term = np.array([[np.nan, 0.4, np.nan, 0.2], [np.nan, 0.6, 0.3, np.nan]])  # steps without a labelled passage: NaN
    fig = training_curves({"anchored": {"task": task, "anchor@1": term}, "control": {"task": task + 1,
                                                                                     "anchor@1": np.full((2, 4), np.nan)}},
                          window=1)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    (t_anchored, t_control) = by_title["task loss"].get_lines()
    assert list(t_anchored.get_ydata()) == pytest.approx([4.0, 3.0, 2.0, 1.5])
    assert list(t_control.get_ydata()) == pytest.approx([5.0, 4.0, 3.0, 2.5])
    (term_panel,) = [ax for t, ax in by_title.items() if t.startswith("term anchor@1")]
    (line,) = term_panel.get_lines()  # the control never had the term: no line for it
    assert np.isnan(line.get_ydata()[0]) and list(line.get_ydata()[1:]) == pytest.approx([0.5, 0.3, 0.2])


def test_the_shaded_text_colours_every_character_of_a_token_on_a_scale_of_the_largest_magnitude():
    from matplotlib.patches import Rectangle

    from anchoring.kinds.lm.figures import shaded_text

    fig = shaded_text([("p", "abcdef", np.array([0.25, -0.5, np.nan]), [(0, 2), (2, 4), (4, 6)])])
    ax = fig.axes[0]
    assert "blue −0.50" in ax.get_title(loc="right") and "red +0.50" in ax.get_title(loc="right")
    patches = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(patches) == 4  # both characters of each scored token; the unscored token's stay blank


def test_a_finished_run_keeps_an_infinite_target_infinite_in_its_summary(corpus, tmp_path, monkeypatch):
    from anchoring.kinds.lm import kind
    from anchoring.kinds.lm.report import summary_lines

    real = kind.summarize

    def with_a_ratio(*a, **kw):
        s = real(*a, **kw)
        s["targets"]["ratio ≥ 3"] = {"median": float("inf"), "met": True}  # as a ratio over seeds that removed nothing
        return s

    monkeypatch.setattr(kind, "summarize", with_a_ratio)
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=2", 'lm.arms=["control"]',
                                                      "evaluate.shade_passages=0"))
    lifecycle.run(cfg, tmp_path / "run")
    saved = lifecycle.show(tmp_path / "run").summary
    assert saved["targets"]["ratio ≥ 3"]["median"] is None  # JSON has no ∞ ...
    assert "met   ratio ≥ 3: ∞" in summary_lines(saved)  # ... and the mark keeps it from reading "undefined"


def test_load_run_generates_from_the_last_context_tokens_at_the_asked_temperature_and_seed(finished):
    path, _ = finished
    run = lifecycle.load_run(path)
    ctx = run.model("anchored").context
    long = " ".join(CALM) + " " + " ".join(VIOLENT)  # its start and its end differ
    assert len(long) > 2 * ctx
    tail = long[-ctx:]  # character tokens: the last `context` characters
    greedy = run.generate(long, arm="anchored", n=8, temperature=0)
    assert greedy[len(long):] == run.generate(tail, arm="anchored", n=8, temperature=0)[len(tail):]
    # a temperature near 0 is (almost surely) greedy; a hot one with a fixed sampling seed repeats itself
    assert run.generate("He drew his ", arm="anchored", n=8, temperature=1e-3) == run.generate(
        "He drew his ", arm="anchored", n=8, temperature=0)
    hot = [run.generate("He drew his ", arm="anchored", n=40, temperature=1.5, sample_seed=s) for s in (0, 0, 1)]
    assert hot[0] == hot[1] and hot[0] != hot[2]


def test_load_run_alignment_reads_the_first_anchored_site_by_default(finished):
    path, summary = finished
    run = lifecycle.load_run(path)
    text = VIOLENT[0] + " " + CALM[0]
    default = run.alignment(text, arm="anchored")[0]["values"]
    assert summary["anchored_sites"][0] == "blocks.0"
    assert torch.equal(default, run.alignment(text, arm="anchored", site="blocks.0")[0]["values"])
    assert not torch.equal(default, run.alignment(text, arm="anchored", site="blocks.1")[0]["values"])


def test_a_word_inside_a_longer_stage_span_keeps_the_whole_span():
    from anchoring.text import concept_spans

    line = "Kills him with a dagger and then departs the stage."  # a stage line; "Kills" and "dagger" inside it
    assert concept_spans(line, "violence") == [(0, len(line))]


@pytest.mark.parametrize("paragraphs, violent, arms, message", [
    (3, 0.3, '["anchored","control"]', r"leaves no validation passages; use more text or a larger split$"),
    (60, 1.0, '["control","oracle-filtered"]',  # every passage is violent: the oracle filter removes them all
     r"^arm 'oracle-filtered' \(seed 0\) would train on 0 tokens, fewer than one window of 65 tokens"),
])
def test_text_too_small_for_the_experiment_is_refused_before_anything_is_written(tmp_path, paragraphs, violent, arms, message):
    corpus = write_corpus(tmp_path / "texts", files=1, paragraphs=paragraphs, violent=violent)
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=5", f"lm.arms={arms}"))
    with pytest.raises(AnchoringError, match=message):
        lifecycle.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
