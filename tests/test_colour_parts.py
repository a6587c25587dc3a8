"""The colour kind's parts one at a time, on inputs whose answers are known by hand: structure and
stability figures, the edit tables, the relearning table, similarity and sampling weights, term
checks and the figures' running mean. (Each test here fails on a deliberate bug that the trained
end-to-end tests let through.)"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from anchoring import experiments
from anchoring.anchor import Concept
from anchoring.domains.colour import NAMES, get_labeller, hsv_similarity, hsv_weights, rgb_to_hsv
from anchoring.errors import AnchoringError


def test_a_wheel_turning_clockwise_is_in_order():
    from anchoring.kinds.colour.structure import hue_order_agreement

    angle = -2 * math.pi * torch.arange(12) / 12  # the hues in order, the other way round
    z = torch.stack([angle.cos(), angle.sin()], -1)
    assert float(hue_order_agreement(z, (0, 1))) == 1.0


def test_vibrant_colours_are_fully_saturated_and_bright():
    from anchoring.kinds.colour.structure import vibrant_colours

    hsv = rgb_to_hsv(vibrant_colours(36))
    assert torch.allclose(hsv[:, 1:], torch.ones(36, 2))


def test_stability_counts_spikes_against_the_median_and_takes_the_last_loss():
    from anchoring.studies.stability import loss_spikes, stability

    assert loss_spikes(np.r_[np.ones(49), 100.0, 5.0]) == 1  # step 50: 5 > 3 × the median (1) of the 50 before it
    row = {"val_mse": 0.1, "hue_order": True, "structure": {"hue_order": 1.0, "vibrant_in_plane": 1.0}}
    got = stability({"seed": [0, 0, 0, 1, 1, 1], "loss": [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]}, {"seeds": [row, row]})
    assert got["final loss (median)"] == pytest.approx(2.5) and got["final loss spread (max/min)"] == pytest.approx(4.0)


def test_a_formed_wheel_needs_the_anchor_within_the_angle():
    from anchoring.studies import formed

    row = {"structure": {"hue_order": 1.0, "anchor_angle_deg": 5.0, "vibrant_in_plane": 0.95, "spread_deg": 3.0}}
    assert formed(row, 25.8)
    row["structure"]["anchor_angle_deg"] = 40.0
    assert not formed(row, 25.8)


def test_a_combination_study_switches_off_only_the_chosen_terms_left_out():
    from anchoring.kinds.colour.objective import build_objective
    from anchoring.studies import combination_config

    cfg = experiments.load("regularizer-combinations")
    names = [t.name for t in build_objective(cfg).terms]
    chosen = cfg.model_copy(update={"combine": names[:2]})
    train, subsets = combination_config(chosen)
    seeds = len(chosen.train.member_seeds())
    masks = {sub: train.train.term_masks[i * seeds] for i, sub in enumerate(subsets)}
    assert masks[(names[0],)] == [True, False, *[True] * (len(names) - 2)]  # the terms not chosen stay on


def test_median_steps_counts_a_recovery_on_the_last_step():
    from anchoring.kinds.colour.control import median_steps

    assert median_steps([10], 10) == "10" and median_steps([None], 10) == ">10"


def test_the_relearning_table_leaves_seeds_at_the_threshold_out_as_not_deleted():
    from anchoring.kinds.colour.control import attack_table

    summary = {"steps": 30, "threshold": 0.01, "concept": "red", "rows": [
        {"model": "anchored", "K": 4, "start_error": 0.2, "steps_to_recover": [0, 12, 20], "start_errors": [0.01, 0.3, 0.2]}]}
    console = Console(record=True, width=200)
    console.print(attack_table(summary))
    text = console.export_text()
    assert "16" in text and "nd 12 20" in text  # median of 12 and 20; the seed left at 0.01 was never deleted


def test_edit_errors_clamp_the_output_and_tables_read_before_and_after():
    from anchoring.kinds.colour.edits import colour_errors, evaluate_edit, named_error_table

    assert float(colour_errors(lambda x: torch.full_like(x, 1.5)[None], torch.ones(1, 3))) == 0.0
    rows = named_error_table(torch.zeros(2, len(NAMES)), torch.ones(2, len(NAMES)), [0, 1])
    assert (rows[0]["before"], rows[0]["after"]) == (0.0, 1.0)
    res = evaluate_edit(lambda x: x[None], lambda x: torch.zeros_like(x)[None], None, 2.0)
    assert float(res["rgb_grid_before"]) == 0.0 and float(res["rgb_grid_after"]) > 0.1
    assert float(res["hsv_grid_before"]) == 0.0 and float(res["hsv_grid_after"]) > 0.1


def test_a_direction_concept_is_most_similar_to_its_own_exemplar():
    from anchoring.kinds.colour.edits import concept_similarity

    red = Concept("red", get_labeller("red"), anchor=(1.0, 0.0, 0.0, 0.0))
    assert float(concept_similarity(red, torch.tensor([[1.0, 0.0, 0.0]]))) == pytest.approx(1.0)


def test_pruning_renumbers_a_subspace_concepts_dims():
    from anchoring.kinds.colour.control import _reindex

    assert _reindex(Concept("c", None, dims=(2, 3)), [1], 4).dims == (1, 2)
    assert _reindex(Concept("c", None, dims=(2, 3)), [2], 4) is None


def test_anchor_cosine_normalises_the_direction():
    from anchoring.kinds.colour.metrics import anchor_cosine

    assert float(anchor_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([2.0, 0.0]))) == pytest.approx(1.0)


def test_hsv_similarity_and_chroma_weights_by_hand():
    # red (h 0, s 1, v 1) and (0.5, 0.25, 0) (h 30°, s 1, v 0.5): r = 0.75, hue term 0.75·(1 − 30/90) + 0.25
    assert float(hsv_similarity(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, 0.25, 0.0]))) == pytest.approx(0.375)
    assert float(hsv_weights(torch.zeros(1, 3))) == pytest.approx(1e-3)  # black stays reachable


def test_an_hsv_grid_with_chroma_weights_is_weighted():
    from anchoring.kinds.colour.objective import training_points

    cfg = experiments.load("anchored", ['data.space="hsv"', 'data.weights="chroma"'])
    _, weights = training_points(cfg)
    assert float(weights.min()) == pytest.approx(1e-3) and float(weights.max()) == pytest.approx(1.0)


def test_term_dims_must_lie_inside_the_site_and_repeated_names_are_numbered_from_one():
    from anchoring.kinds.colour.objective import build_objective
    from anchoring.kinds.colour.sites import check_term_site

    cfg = experiments.load("anchored")
    with_dims = next(t for t in build_objective(cfg).terms if t.params.get("dims"))
    width = max(with_dims.params["dims"])
    with pytest.raises(AnchoringError, match="outside site"):
        check_term_site(with_dims, width)
    first = cfg.terms[0]
    name = build_objective(cfg).terms[0].name
    twice = cfg.model_copy(update={"terms": [first, first.model_copy()]})
    assert [t.name for t in build_objective(twice).terms] == [f"{name}#1", f"{name}#2"]


def test_the_metrics_table_names_each_members_own_seed():
    from anchoring.kinds.colour.training import metrics_table

    timeline = SimpleNamespace(table=lambda: np.zeros((3, 1)))
    result = SimpleNamespace(metrics=torch.zeros(3, 2, 1), timeline=timeline, seeds=[5, 7])
    assert set(metrics_table(result)[:, 1].tolist()) == {5.0, 7.0}


def test_the_running_mean_skips_zeros_and_trails_the_step():
    from anchoring.report.figures import running_mean

    got = running_mean(np.array([0.0, 2.0, 0.0, 4.0]), 4)
    assert np.isnan(got[0]) and got[1:].tolist() == [2.0, 2.0, 3.0]
    assert running_mean(np.array([1.0, 2.0, 3.0]), 2).tolist() == [1.0, 1.5, 2.5]


def test_an_encoder_that_puts_every_colour_on_the_anchor_has_no_anchor_loss():
    from anchoring.domains.colour import named_rgb
    from anchoring.kinds.colour.metrics import concept_exemplar
    from anchoring.kinds.colour.objective import build_objective
    from anchoring.kinds.colour.summary import summarize_seeds

    assert torch.equal(concept_exemplar(get_labeller("red"), named_rgb()), torch.tensor([1.0, 0.0, 0.0]))
    cfg = experiments.load("anchored", ["train.seeds=2"])
    objective = build_objective(cfg)
    anchor = torch.tensor(next(c for c in objective.concepts if c.name == "red").anchor)

    def encode(rgb):
        return anchor.expand(2, *rgb.shape[:-1], len(anchor))

    validation = torch.cat([torch.rand(200, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([[1.0, 0.0, 0.0]] * 4)])
    assert get_labeller("red").exact(validation).bool().any()  # exactly labelled red colours to score
    rows = summarize_seeds(encode, lambda rgb: rgb.expand(2, *rgb.shape), cfg, objective, validation)
    assert all(r["anchor_cos"] == pytest.approx(1.0) and r["val_anchor_loss"] == pytest.approx(0.0, abs=1e-6) for r in rows)
    red = get_labeller("red").exact(validation).bool()

    def only_red_on_it(rgb):  # the loss is the concept's: colours that are not red are not charged for being elsewhere
        lab = get_labeller("red").exact(rgb.reshape(-1, 3)).bool().reshape(rgb.shape[:-1])
        z = torch.where(lab[..., None], anchor, -anchor)
        return z.expand(2, *z.shape)

    assert not red.all()
    rows = summarize_seeds(only_red_on_it, lambda rgb: rgb.expand(2, *rgb.shape), cfg, objective, validation)
    assert all(r["val_anchor_loss"] == pytest.approx(0.0, abs=1e-6) for r in rows), rows


def test_the_relearning_baseline_keeps_the_runs_learning_rate_and_data_curriculum():
    """The unanchored baseline once kept only the learning rate, so on a curriculum it trained on other
    data than the anchored arm it is compared with."""
    import csv
    import io

    from anchoring import experiments
    from anchoring.kinds.colour.control import lr_schedule

    cfg = experiments.load("smooth-curriculum")
    rows = list(csv.reader(io.StringIO(lr_schedule(cfg.schedule))))
    assert rows[0] == ["STEP", "lr", "extent"]
    source = [r for r in csv.reader(io.StringIO(cfg.schedule)) if r and not r[0].startswith("#")]
    col = source[0].index("extent")
    assert [r[2] for r in rows[1:]] == [r[col] if col < len(r) else "" for r in source[1:]]
