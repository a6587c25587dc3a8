"""Labelling functions on hand-written sentences, label sets and draws, the CLI, and the gold set."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from anchoring.cli import app
from anchoring.domains.text.config import TextConfig
from anchoring.domains.text.corpus import stage_spans
from anchoring.domains.text.labelling import Passages, concept_spans, score_matrix, stage_violence
from anchoring.domains.text.lexicons import lexicon_hits
from anchoring.domains.text.weak import draw, label_probability, weak_set
from anchoring.errors import AnchoringError
from anchoring.text import weak_labels


def words(text: str, concept: str) -> list[str]:
    return [text[s:e].lower() for s, e, _ in lexicon_hits(text, concept)]


def test_violence_lexicon_fires_and_near_misses():
    assert words("He shall die; they kill'd him and slew the rest.", "violence") == ["die", "kill'd", "slew"]
    assert words("Bloody murder! Stabb'd with a dagger.", "violence") == ["bloody", "murder", "stabb'd", "dagger"]
    for miss in ("A moderate diet and a studied indifference.", "Skilled hands and skillful swordsmanship.",
                 "The deadline is an indie matter.", "He swore by the swordfish."):
        assert words(miss, "violence") == [], miss


def test_early_print_long_s_counts_and_other_case_foldings_do_not_crash():
    """re.I lets "ſlain" match "slain" (and "kıll" match "kill"); the weight lookup used to raise KeyError."""
    assert words("The ſword that ſlew him.", "violence") == ["ſword", "ſlew"]
    assert words("O Satan, ſatan!", "milton") == ["satan", "ſatan"]
    assert words("kıll", "violence") == []


def test_deception_lie_rule():
    assert words("Thou liest, false traitor! That is a lie.", "deception") == ["liest", "false", "traitor", "lie"]
    assert words("I will give him the lie.", "deception") == ["lie"]
    for posture in ("Here lies the king.", "Let us lie down and sleep.", "There thou liest down in the grass.",
                    "I lie in bed."):
        assert words(posture, "deception") == [], posture
    assert words("He deceiv'd me; treachery!", "deception") == ["deceiv'd", "treachery"]
    # "in" is a place, except in the accusation "thou liest in thy throat"
    assert words("Thou liest in thy throat!", "deception") == ["liest"]
    assert words("Thou liest in thy bed.", "deception") == []


def test_stage_direction_function():
    text = "Have at thee!\n[They fight. Tybalt falls.]\nO, I am slain!\n[Dies.]"
    hits = [text[s:e] for s, e in stage_violence(text, stage_spans(text))]
    assert hits == ["fight", "Dies"]
    calm = "Welcome.\n[Enter Romeo, dying of laughter? no: Enter Romeo.]\n[Exeunt.]"
    assert stage_violence("Sit.\n[Exeunt.]", stage_spans("Sit.\n[Exeunt.]")) == []
    assert "fight" not in [calm[s:e] for s, e in stage_violence(calm, stage_spans(calm))]
    assert stage_violence("Dies.\nMore text", []) == [(0, 5)]  # unbracketed direction at a line start


def test_vader_and_metadata_functions():
    p = Passages(["What a lovely happy day!", "O horrible, hateful, wretched misery!"], ["comedy", "tragedy"],
                 ["", "FIRST MURDERER"])
    names, s = score_matrix(p, "violence")
    vader, meta = s[:, names.index("vader:negative")], s[:, names.index("metadata:genre+role")]
    assert vader[0] == 0 and vader[1] > 0.5
    assert meta.tolist() == [0.0, 2.0]
    histories = Passages(["x", "x", "x"], ["history", "comedy", "user"], ["", "", "SOLDIER"])
    _, s = score_matrix(histories, "violence")
    assert s[:, names.index("metadata:genre+role")].tolist() == [1.0, 0.0, 1.0]  # histories count as tragedies do


def test_calibration_puts_the_target_share_at_or_above_the_shift():
    from anchoring.domains.text.weak import calibrate

    x = np.arange(100.0)
    assert np.mean(x >= calibrate(x, 0.1)) == pytest.approx(0.1)  # the top ten
    tied = np.r_[np.zeros(95), np.arange(1.0, 6.0)]  # 95 passages with no hits, tied at the quantile
    t = calibrate(tied, 0.1)
    assert t == 1.0 and np.mean(tied >= t) == pytest.approx(0.05)  # above the ties, not 100% of them


def test_weak_labels_and_spans_api():
    p = weak_labels(["He stabs him with his dagger, and the blood runs.", "A fair morning, sweet and mild."], "violence")
    assert p.shape == (2,) and p[0] >= 0.5 > p[1]
    text = "He stabs him with his dagger."
    assert [text[s:e] for s, e in concept_spans(text, "violence")] == ["stabs", "dagger"]
    with pytest.raises(AnchoringError, match="unknown concept"):
        weak_labels(["x"], "love")


def test_weak_set_rates_exact_and_seeded():
    rng = np.random.default_rng(0)
    ref = (rng.random(30000) < 0.13).astype(np.int8)
    for c, f in ((0.3, 0.0), (0.05, 0.02), (1.0, 0.1)):
        w = weak_set(ref, c, f, seed=7).astype(bool)
        assert abs(w[ref == 1].mean() - c) < 0.01 and abs(w[ref == 0].mean() - f) < 0.01
    assert (weak_set(ref, 0.3, 0.01, 7) == weak_set(ref, 0.3, 0.01, 7)).all()
    assert (weak_set(ref, 0.3, 0.01, 7) != weak_set(ref, 0.3, 0.01, 8)).any()
    for bad in (-0.1, 1.5):
        with pytest.raises(AnchoringError, match="coverage"):
            weak_set(ref, bad, 0.0, 0)


def test_batch_draws_keyed_by_seed_and_step():
    prob = label_probability(np.array([1, 0] * 500), 0.3, 0.05)
    a, b = draw(prob, seed=1, step=10), draw(prob, seed=1, step=10)
    assert (a == b).all()
    assert (draw(prob, seed=1, step=11) != a).any() and (draw(prob, seed=2, step=10) != a).any()
    assert abs(a[::2].mean() - 0.3) < 0.06 and a[1::2].mean() < 0.12


def test_config_validation():
    assert TextConfig().concept == "violence" and TextConfig().coverage == 0.3
    for bad in ({"coverage": 1.5}, {"concept": "love"}, {"split": (0.5, 0.2, 0.2)}, {"tokenizer": "word"}, {"typo": 1}):
        with pytest.raises(ValidationError):
            TextConfig(**bad)


@pytest.mark.parametrize("args,message", [
    (["labels", "love"], "unknown concept"),
    (["labels", "milton"], "needs the mixed corpus"),
    (["labels", "violence", "--coverage", "1.5"], "--coverage"),
    (["labels", "violence", "--corpus", "EMPTY"], "holds no files"),
    (["labels", "violence", "--corpus", "BINARY"], "binary"),
])
def test_cli_errors_write_nothing(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "BINARY").mkdir()
    (tmp_path / "BINARY" / "x.txt").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    args = [str(tmp_path / a) if a in ("EMPTY", "BINARY") else a for a in args]
    r = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_report_on_folder(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("He drew his sword and slew the traitor; blood ran.\n\nA quiet supper.\n\n"
                             "They fight, and the murderer dies.\n\nThe garden in spring.\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["labels", "violence", "--corpus", str(d), "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passages"] == 4 and set(summary["functions"]) >= {"lexicon:violence", "stage:violence"}
    # the count behind the coverage: 30% of 2 positives is 1 passage (and 20% would be none)
    assert re.search(r"positives labelled\s*│\s*1 of 2", r.stdout), r.stdout
    # the one labelled positive has words to mark, and the share is of all 2 positives
    assert summary["weak_coverage_with_a_span"] == 0.5
    # the lexicon fires on passages 0 and 2, the stage function on 2 ("They fight" opens a line)
    pair = {(p["a"], p["b"]): p for p in summary["pairs"]}
    assert {k: pair["lexicon:violence", "stage:violence"][k] for k in ("overlap", "jaccard", "conflict")} == {
        "overlap": 1, "jaccard": 0.5, "conflict": 1}
    page = (out / "report.html").read_text()
    assert "<mark>slew</mark>" in page and "http" not in page
    # a folder may hold Milton: the labeller decides there (only the plays alone are refused)
    (d / "b.txt").write_text("Of Man's first disobedience, and the fruit of that forbidden tree, Satan and Eden lost.\n")
    r = CliRunner().invoke(app, ["labels", "milton", "--corpus", str(d), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["passages"] == 5
    # the same folder again: the earlier report is replaced, and the output says so
    r = CliRunner().invoke(app, ["labels", "violence", "--corpus", str(d), "--out", str(out)])
    assert r.exit_code == 0 and "(replacing an earlier labels report)" in r.stdout, r.stderr
    assert json.loads((out / "summary.json").read_text())["passages"] == 5


def test_labels_never_write_over_a_run(tmp_path):
    """A run folder has its own summary.json and report.html: --out there once replaced them, and the run
    no longer opened."""
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("He drew his sword and slew the traitor.\n\nA quiet supper.\n")
    run = tmp_path / "run"
    run.mkdir()
    for name, text in (("config.toml", "kind = 'lm'\n"), ("summary.json", '{"kind": "lm"}'), ("report.html", "<p>run</p>")):
        (run / name).write_text(text)
    r = CliRunner().invoke(app, ["labels", "violence", "--corpus", str(d), "--out", str(run)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "holds other files" in r.stderr, r.stderr
    assert (run / "summary.json").read_text() == '{"kind": "lm"}' and (run / "report.html").read_text() == "<p>run</p>"


def test_the_report_counts_positives_that_span_labels_cannot_mark(tmp_path):
    """Negative sentiment alone makes a deception positive with no word to mark: span labels train it
    as unlabelled text, so the report gives the coverage they really have."""
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("I hate this horrible, awful, terrible misery and grief.\n\n"
                             "The liar deceived us with false words.\n\nA fair morning.\n")
    r = CliRunner().invoke(app, ["labels", "deception", "--corpus", str(d), "--coverage", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["reference_positive_rate"] == pytest.approx(2 / 3) and summary["weak_coverage"] == 1.0
    assert summary["reference_positives_with_a_span"] == 0.5 and summary["weak_coverage_with_a_span"] == 0.5


def test_reference_violence_against_gold():
    """Hand-labelled gold set (src/anchoring/domains/text/data/violence_gold.csv). Numbers are in-sample: the lexicon weights
    and the metadata weight were adjusted once after looking at the errors on this set."""
    from anchoring.domains.text.report import gold_scores, read_gold

    rows = read_gold()
    assert len(rows) == 210 and sum(r["stratum"] == "random" for r in rows) == 150
    g = gold_scores(rows)
    assert g["combined"]["gold_positives"] == 38
    assert g["combined"]["precision"] >= 0.70 and g["combined"]["recall"] >= 0.68  # measured 0.730, 0.711
    assert g["random"]["precision"] >= 0.78 and g["random"]["recall"] >= 0.44  # measured 0.818, 0.474
    assert g["tragedy_history"]["recall"] >= 0.90  # measured 0.947


@pytest.mark.slow
def test_calibration_shifts_still_give_target_rates():
    from anchoring.domains.text.corpus import load_corpus
    from anchoring.domains.text.weak import COMBINERS, reference_labels

    p = Passages.of(load_corpus("shakespeare"))
    for concept in ("violence", "deception"):
        assert abs(reference_labels(p, concept).mean() - COMBINERS[concept].target_rate) < 0.005
    ref = reference_labels(p, "violence")
    w = weak_set(ref, 0.3, 0.02, seed=5).astype(bool)
    assert abs(w[ref == 1].mean() - 0.3) < 0.01 and abs(w[ref == 0].mean() - 0.02) < 0.01


def test_milton_reference_labels_are_exact_only_where_the_source_is_known():
    """A built-in corpus knows each passage's author; a user's folder (domain "user") does not, and may
    hold Milton, so the labeller decides there instead of every passage counting as not Milton."""
    from anchoring.domains.text.weak import reference_labels

    milton = ("Of Mans First Disobedience, and the Fruit Of that Forbidden Tree, whose mortal tast Brought Death into "
              "the World, and all our woe, With loss of Eden, till one greater Man Restore us, and regain the blissful "
              "Seat, Sing Heav'nly Muse, that on the secret top Of Oreb: Satan thir")
    texts = [milton, "Good morrow, my lord. How does your honour?"]
    assert list(reference_labels(Passages(texts, domain=["user", "user"]), "milton")) == [1, 0]
    # known sources are exact, whatever the words say
    assert list(reference_labels(Passages(texts, domain=["shakespeare", "milton"]), "milton")) == [0, 1]


def test_split_fractions_with_nan_are_refused_and_api_labels_refuse_a_bare_string():
    from anchoring.domains.text.weak import weak_set
    from anchoring.errors import AnchoringError
    from anchoring.text import weak_labels

    for bad in ((0.9, float("nan"), 0.05), (float("nan"), 0.5, 0.5)):  # NaN passed both checks: an empty part, silently
        with pytest.raises(ValidationError, match="split fractions|split.[0-2]\n  Input should be a finite number"):
            TextConfig(split=bad)
    with pytest.raises(AnchoringError, match="takes a list of texts"):
        weak_labels("he drew his sword", "violence")  # list("abc") labelled each character
    ref = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    assert (weak_set(ref, np.float32(0.5), 0.0, 0) == weak_set(ref, 0.5, 0.0, 0)).all()  # numpy numbers are numbers
    with pytest.raises(AnchoringError, match="coverage must be between 0 and 1, got True"):
        weak_set(ref, True, 0.0, 0)


def test_a_report_that_fails_half_way_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """A full disk at summary.json left a new report.html beside the old summary.json (which a later
    run then took for a whole report), or, in a new folder, a lone report.html that blocked a retry."""
    import errno

    from anchoring.domains.text import report

    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("He drew his sword and slew the traitor.\n\nA quiet supper.\n\nThey fight and die.\n")
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["labels", "violence", "--corpus", str(d), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_json", full)
    for folder in (out, tmp_path / "fresh"):
        r = CliRunner().invoke(app, ["labels", "violence", "--corpus", str(d), "--coverage", "1", "--out", str(folder)])
        assert r.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "fresh").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "texts"]
