"""What an LM run's summary says, computed from stub rows and stub data (no training): the target
lines at their thresholds, the positions counted, the weak labels' real coverage, and the checks
on the passages the run scores and relearns from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from anchoring import experiments
from anchoring.errors import AnchoringError
from anchoring.kinds.lm import checks, kind, report
from anchoring.kinds.lm import evaluate as ev

SITES = ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]


def _row(arm: str, seed: int, all_: float, margin: float = 0.0, containment: float = 0.0) -> dict:
    align = {s: {"concept": margin, "retain": 0.0, "margin": margin, "containment": containment} for s in SITES}
    return {"arm": arm, "seed": seed, "loss": {"all": all_, "concept": all_ + 0.5, "retain": all_}, "alignment": align}


def _targets(control_loss: float, margin: float, containment: float) -> dict:
    cfg = experiments.load("lm-anchor")  # anchored at blocks.3
    rows = [_row("control", 0, control_loss), _row("anchored", 0, control_loss, margin, containment)]
    cls = np.full((2, 5), ev.RETAIN)
    es = SimpleNamespace(passages=[0, 1], cls=cls)
    return kind.summarize(cfg, rows, ["anchored", "control"], es, SITES)["targets"]


@pytest.mark.parametrize("control_loss, margin, containment, met", [
    (1.60, 0.30, 0.10, (True, True, True)),  # each at its bound counts as met
    (1.61, 0.29, 0.11, (False, False, False)),
    (1.20, 0.90, -0.20, (True, True, True)),
])
def test_each_target_line_is_judged_on_its_own_number_at_its_own_bound(control_loss, margin, containment, met):
    t = _targets(control_loss, margin, containment)
    lines = (t["control validation loss ≤ 1.60 nats/char"], t["margin at blocks.3 ≥ 0.3"], t["containment at blocks.3 ≤ 0.1"])
    assert tuple(x["median"] for x in lines) == pytest.approx((control_loss, margin, containment))
    assert tuple(x["met"] for x in lines) == met


def test_the_positions_counted_are_the_predicted_tokens():
    """The counts are of predicted tokens, whose nats make up the losses: the first column of a window is
    never predicted, and a token followed by padding predicts nothing (the last real token of the set)."""
    cfg = experiments.load("lm-anchor")
    cls = np.array([[ev.CONCEPT, ev.RETAIN, ev.OTHER, ev.CONCEPT], [ev.RETAIN, ev.CONCEPT, ev.PAD, ev.PAD]])
    es = SimpleNamespace(passages=[0, 1, 2], cls=cls)
    summary = kind.summarize(cfg, [_row("control", 0, 1.5)], ["control"], es, SITES)
    assert summary["eval"]["positions"] == {"concept": 2, "retain": 1, "all": 4}  # inputs would give 2, 2, 5
    assert summary["eval"]["passages"] == 3


def test_label_coverage_counts_only_reference_positives_the_weak_labels_hit():
    """False positives are labels on calm passages: they add nothing to the concept's coverage."""
    reference = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    weak = np.array([1, 0, 0, 0, 1, 1, 1, 0])  # one true positive of four, three false positives
    data = SimpleNamespace(reference=reference, parts={"train": np.arange(8)}, weak=lambda seed: weak,
                           span_masks=lambda: None, text=SimpleNamespace(coverage=0.25, weak_labels="passages"))
    out = kind.label_coverage(data, [0])
    assert out["per_seed"]["0"] == {"coverage": 0.25, "with_a_span": None}


def test_a_target_line_names_the_seeds_it_had_no_value_for():
    assert report.left_out_note({"undefined_seeds": 2, "undefined_counted_as": 0.0}) == " (2 seeds undefined, counted as 0)"
    assert report.left_out_note({"undefined_seeds": 1, "undefined_counted_as": None}) == " (1 seed undefined, left out)"
    assert report.left_out_note({"undefined_seeds": 0}) == "" and report.left_out_note({}) == ""


def _passages(reference: list[int], texts: list[str]):
    return SimpleNamespace(reference=np.array(reference), texts=texts)


def test_scored_text_needs_passages_with_and_without_the_concept(monkeypatch):
    cfg = experiments.load("lm-anchor")
    monkeypatch.setattr(ev, "eval_passages", lambda d, n, order: np.arange(len(d.texts)))
    violent, calm = "He drew his sword and stabbed him.", "The birds sang sweetly."
    checks.check_scored(cfg, _passages([1, 0], [violent, calm]), "evaluate.eval_chars", 1000)
    with pytest.raises(AnchoringError, match="no passage without it"):
        checks.check_scored(cfg, _passages([1, 1], [violent, violent]), "evaluate.eval_chars", 1000)
    with pytest.raises(AnchoringError, match="no passage with 'violence'"):
        checks.check_scored(cfg, _passages([0, 0], [calm, calm]), "evaluate.eval_chars", 1000)


def test_relearning_may_ask_for_every_passage_that_carries_the_concept_but_not_more():
    train = np.array([1, 0, 1, 1, 0])  # three passages carry the concept
    data = SimpleNamespace(reference=train, parts={"train": np.arange(5)})
    checks.check_relearnable(experiments.load("lm-unlearning", ["unlearning.relearn_k=[1,3]"]), data)
    with pytest.raises(AnchoringError, match="K = 4 asks for more passages than the 3"):
        checks.check_relearnable(experiments.load("lm-unlearning", ["unlearning.relearn_k=[4]"]), data)
