"""The LM kind's config refuses what cannot run as written, at its edges, and accepts the edge
cases that can: no training, only `experiments.load`."""

from __future__ import annotations

import pytest

from anchoring import experiments
from anchoring.errors import AnchoringError


@pytest.mark.parametrize("overrides, message", [
    (['lm.arms=["control","control"]'], "arms must be distinct"),  # the same arm twice would train it twice
    (["sgtm.heads=0", "sgtm.mlp_fraction=0"], "designate no forget parameters"),  # sgtm would be a second control
    (["unlearning.relearn_k=[4,4]"], "relearn_k entries must be distinct"),
    (["sgtm.layers=[1,1]"], "sgtm.layers must be distinct"),
    (["routing.layers=[4]"], "routing.layers: no block 4"),  # four blocks: 0..3
    (["sgtm.layers=[4]"], "sgtm.layers: no block 4"),
    (["sgtm.heads=5"], "sgtm.heads = 5 exceeds the model's 4 heads"),
    (["lm.width=132", "lm.heads=4"], "must split into 4 heads of even size"),  # heads of 33: rotary needs pairs
    (["lm.batch_size=15", "lm.nproc=2"], "does not split over nproc = 2"),
    (["lm.window=257"], "window 257 is longer than the model's context 256"),
    (["routing.layers=[0,0]"], r"routing.layers must be distinct and non-empty, got \[0, 0\]"),
    (["routing.layers=[]"], "routing.layers must be distinct and non-empty"),  # a routing arm that routes nowhere
    (["unlearning.relearn_k=[]"], "relearn_k needs at least one K"),
    (["unlearning.relearn_k=[4,0]"], "relearn_k entries must be positive passage counts, got 0"),
    (['unlearning.posthoc=["leace","leace"]'], "posthoc methods must be distinct"),
])
def test_a_config_that_cannot_run_as_written_is_refused(overrides, message):
    with pytest.raises(AnchoringError, match=message):
        experiments.load("lm-unlearning", overrides)


@pytest.mark.parametrize("overrides", [
    ["lm.window=256"],  # a window as long as the context
    ["routing.layers=[3]", "sgtm.layers=[3]"],  # the last block
    ["sgtm.heads=4"],  # every head
    ["sgtm.heads=0"],  # MLP units only
    ["sgtm.mlp_fraction=0"],  # heads only
    ["lm.width=120", "lm.heads=4"],  # heads of 30
    ["lm.batch_size=16", "lm.nproc=2"],
])
def test_the_edge_cases_that_can_run_are_accepted(overrides):
    experiments.load("lm-unlearning", overrides)


def test_a_shorter_window_cuts_training_windows_below_the_context():
    cfg = experiments.load("lm-anchor", ["lm.window=64"])
    assert (cfg.lm.context, cfg.lm.tokens) == (256, 64)
    assert experiments.load("lm-anchor").lm.tokens == 256  # default: the whole context


def test_concept_positions_and_routing_default_to_what_the_docs_state():
    """docs/method.md and docs/lm.md score a concept word and the 20 characters after it, and give
    the routing baseline its extra units in the first two blocks."""
    cfg = experiments.load("lm-unlearning")
    assert cfg.evaluate.after == 20
    assert cfg.routing.layers == [0, 1]
