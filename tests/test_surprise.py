"""Surprisal, entropy and s₂ on hand-built distributions; sliding windows; passage means."""

from __future__ import annotations

import math

import pytest
import torch

from anchoring.domains.text.tokenize import CharTokenizer
from anchoring.errors import AnchoringError
from anchoring.evaluate.surprise import passage_means, score_ids, score_text, token_scores, windows
from anchoring.models.ngpt import NormalizedTransformer


def test_uniform_gives_zero_s2_exactly():
    V = 50
    logits = torch.zeros(3, 7, V)
    targets = torch.randint(0, V, (3, 7))
    i, h, s2 = token_scores(logits, targets)
    assert torch.allclose(i, torch.full_like(i, math.log(V)))
    assert torch.allclose(h, torch.full_like(h, math.log(V)))
    assert s2.abs().max() < 1e-6


def test_confident_wrong_is_large_positive_and_confident_right_is_zero_from_below():
    V = 80
    logits = torch.full((2, V), -10.0)
    logits[:, 3] = 10.0  # both predict token 3 with p ≈ 1
    i, h, s2 = token_scores(logits, torch.tensor([5, 3]))
    assert s2[0] > 4  # wrong: i ≈ 20 nats, h ≈ 0, log 80 ≈ 4.4
    assert -1e-3 < s2[1] < 0  # right: i ≈ ε < h ≈ ε log(1/ε)
    assert i[1] < h[1]


def test_expectation_of_s2_under_the_model_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(6, 30) * 2
    p = logits.softmax(-1)
    expected = torch.stack([(p[:, v] * token_scores(logits, torch.full((6,), v))[2]) for v in range(30)]).sum(0)
    assert expected.abs().max() < 1e-5


def test_masked_vocabulary_entries_do_not_give_nan():
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    i, h, s2 = token_scores(logits, torch.tensor([1]))
    assert torch.isfinite(h).all() and abs(float(h) - math.log(2)) < 1e-6
    assert abs(float(s2)) < 1e-6


def test_shapes_must_match():
    with pytest.raises(ValueError):
        token_scores(torch.zeros(2, 3, 5), torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("T,C,stride", [(1, 8, None), (2, 8, None), (8, 8, None), (9, 8, None), (100, 8, 3), (100, 16, 15), (37, 8, 1)])
def test_windows_score_every_position_once_with_enough_context(T, C, stride):
    ws = windows(T, C, stride)
    scored = [q for _, first, stop in ws for q in range(first, stop)]
    assert scored == list(range(1, T))
    st = C // 2 if stride is None else stride
    for a, first, stop in ws:
        assert a >= 0 and stop <= min(a + C, T) and first >= 1
        if a > 0:
            assert first - a >= C - st  # the first scored token of a later window sees ≥ C − stride tokens


def test_the_default_stride_is_half_the_context():
    assert windows(100, 8) == windows(100, 8, 4)


def test_windows_reject_bad_arguments():
    with pytest.raises(AnchoringError):
        windows(10, 1)
    with pytest.raises(AnchoringError):
        windows(10, 8, 8)


class Lookup(torch.nn.Module):
    """A bigram 'model': logits depend only on the current token, so windowing cannot change them."""

    def __init__(self, V: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.table = torch.nn.Parameter(torch.randn(V, V))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def test_sliding_window_matches_the_full_pass_for_a_context_free_model():
    V, T = 11, 300
    model = Lookup(V)
    ids = torch.randint(0, V, (T,))
    sc = score_ids(model, ids, context=32, stride=10, batch=4)
    i, h, s2 = token_scores(model(ids[None])[0, :-1], ids[1:])
    assert math.isnan(sc.surprisal[0]) and math.isnan(sc.s2[0])
    assert torch.allclose(sc.surprisal[1:], i, atol=1e-5)
    assert torch.allclose(sc.entropy[1:], h, atol=1e-5)
    assert torch.allclose(sc.s2[1:], s2, atol=1e-5)
    assert sc.log_vocab == pytest.approx(math.log(V))


def test_transformer_text_within_context_equals_one_pass_and_mode_is_restored():
    tok = CharTokenizer.train(["to be or not to be, that is the question\n"])
    model = NormalizedTransformer(tok.vocab_size, width=32, layers=2, heads=2, context=64)
    model.train()
    text = "to be or not to be"
    spans, sc = score_text(model, tok, text, context=64)
    assert model.training
    assert spans == [(k, k + 1) for k in range(len(text))] and len(sc) == len(text)
    ids = torch.tensor(tok.encode(text))
    with torch.no_grad():
        i, _, _ = token_scores(model(ids[None])[0, :-1], ids[1:])
    assert torch.allclose(sc.surprisal[1:], i, atol=1e-5)


def test_single_token_has_no_score_but_knows_the_vocabulary():
    sc = score_ids(Lookup(7), [3], context=8)
    assert len(sc) == 1 and math.isnan(sc.surprisal[0]) and sc.log_vocab == pytest.approx(math.log(7))
    assert math.isnan(sc.mean()["s2"])


def test_passage_means_ignore_the_unscored_first_token():
    sc = score_ids(Lookup(5), torch.tensor([0, 1, 2, 3, 4, 0, 1]), context=8)
    spans = [(k, k + 1) for k in range(7)]
    first, second = passage_means(sc, spans, [(0, 3), (3, 7)])
    assert first["s2"] == pytest.approx(float(sc.s2[1:3].mean()), abs=1e-6)
    assert second["surprisal"] == pytest.approx(float(sc.surprisal[3:7].mean()), abs=1e-6)


def test_a_model_or_tokenizer_that_breaks_the_contract_is_named_in_one_line():
    """Scoring takes any causal LM: one that returns (B, V) logits (the last position only, as some
    generation APIs do) or a tokenizer whose spans disagree with its ids would misalign every score."""
    def last_position(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 5)

    with pytest.raises(AnchoringError, match=r"^model gave logits of shape \(1, 5\) for ids \(1, 4\); expected \(B, T, V\)$"):
        score_ids(last_position, [1, 2, 3, 4], context=8)

    class Dropping(CharTokenizer):
        def spans(self, text: str) -> list[tuple[int, int]]:
            return super().spans(text)[:-1]

    tok = Dropping("abcd")
    with pytest.raises(AnchoringError, match=r"^tokenizer gave 4 ids but 3 spans for the same text$"):
        score_text(last_position, tok, "abcd", context=8)
