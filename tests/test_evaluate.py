import math

import numpy as np
import pytest
import torch

from anchoring.kinds.colour.metrics import anchor_cosine, hue_winding, hues_in_order


def ring(angles_deg, dims=4):
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    z = torch.zeros(len(angles_deg), dims)
    z[:, 0], z[:, 1] = torch.cos(a), torch.sin(a)
    return z


def test_hue_order_accepts_both_orientations_and_rejects_swaps():
    ordered = ring([30 * i for i in range(12)])
    assert hues_in_order(ordered) and float(hue_winding(ordered)) == pytest.approx(1.0)
    assert hues_in_order(ring([-30 * i for i in range(12)]))  # mirror image is fine
    swapped = ring([0, 60, 30, *[30 * i for i in range(3, 12)]])
    assert not hues_in_order(swapped)
    clumped = ring([5 * i for i in range(12)])  # in order but not going round
    assert not hues_in_order(clumped) and round(float(hue_winding(clumped))) == 0
    # batched over seeds, and reading another pair of dims
    both = torch.stack([ordered, swapped])
    assert hues_in_order(both).tolist() == [True, False]
    assert not hues_in_order(ordered, dims=(2, 3))


def test_anchor_cosine():
    z = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])
    assert torch.allclose(anchor_cosine(z, torch.tensor([1.0, 0, 0, 0])), torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]))


def test_a_target_number_never_rounds_onto_its_bound():
    from anchoring.evaluate.stats import target_text

    assert target_text(0.0204) == "0.0204" and target_text(0.2996) == "0.2996" and target_text(0.29996) == "0.29996"
    assert target_text(0.3) == "0.300" and target_text(1.476) == "1.476" and target_text(-0.25) == "-0.250"
    assert target_text(float("nan")) == "undefined" and target_text(None) == "undefined"


def test_probe_halves_alternate_a_class_whose_passages_share_one_parity():
    from anchoring.kinds.lm.evaluate import probe_halves

    # the parity split works: it is kept as it was
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([2, 3, 4, 5, 3, 4])
    assert probe_halves(y, p).tolist() == (p % 2 == 0).tolist()
    # every concept passage odd (as Milton's held-out ones are): concept passages alternate, retain too
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([11, 11, 13, 15, 2, 3, 4, 4])
    train = probe_halves(y, p)
    assert train.tolist() == [True, True, False, True, True, False, True, True]
    for half in (train, ~train):
        assert set(y[half]) == {0, 1}
    assert not set(p[train]) & set(p[~train])  # no passage on both sides

    with pytest.raises(ValueError, match="both classes"):  # a passage on both sides is refused, not split
        probe_halves(np.array([1, 0, 0]), np.array([3, 1, 3]))


def test_a_probe_scores_the_concept_with_and_without_the_anchor_and_is_undefined_on_too_little_data():
    from anchoring.kinds.lm.evaluate import probes

    g = torch.Generator().manual_seed(0)
    n = 40
    concept, retain = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    concept[:, 0] += 4.0  # the concept lives on dim 0 alone
    passages = {"concept": np.arange(n) % 8, "retain": 8 + np.arange(n) % 8}
    (row,) = probes({"blocks.1": {"concept": concept, "retain": retain}}, passages, None, (0,))
    assert row["site"] == "blocks.1" and row["auc"] > 0.95 and row["auc_without_anchor"] < 0.75
    few = {"concept": concept[:9], "retain": retain}  # under 10 positions of a class: no probe
    one_each = {"concept": concept, "retain": retain}  # each class in one passage: one half would lack a class
    rows = probes({"few": few, "one": one_each}, {"concept": np.zeros(n, int), "retain": np.ones(n, int)}, None, (0,))
    assert all(math.isnan(r["auc"]) and math.isnan(r["auc_without_anchor"]) for r in rows)


def test_an_infinite_median_keeps_its_sign_once_read_back():
    from anchoring.evaluate.stats import mark_infinite, target_median

    marked = mark_infinite({"up": {"median": float("inf")}, "down": {"median": float("-inf")}, "x": {"median": 0.5}})
    assert (marked["up"]["infinite"], marked["down"]["infinite"]) == (1, -1) and "infinite" not in marked["x"]
    back = {k: {kk: vv for kk, vv in t.items() if kk != "median"} for k, t in marked.items()}  # null in summary.json
    assert target_median(back["down"]) == float("-inf") and target_median(back["up"]) == float("inf")


def test_the_median_ranks_infinities_only_when_asked_and_always_leaves_nan_out():
    """One median for the project: seeds that never recovered (inf) rank above every count in the
    relearning tables; elsewhere a non-finite value is no number to take a median of."""
    from anchoring.evaluate.stats import median

    inf, nan = float("inf"), float("nan")
    assert median([8.0, inf, 2.0]) == 5.0 and median([8.0, inf, 2.0], rank_infinite=True) == 8.0
    assert median([8.0, inf], rank_infinite=True) == inf and median([-inf, 1.0, nan], rank_infinite=True) == -inf
    assert median([nan, 3.0, nan], rank_infinite=True) == 3.0 and median([nan]) != median([nan])
