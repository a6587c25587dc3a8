import pytest
import torch

from anchoring import experiments


@pytest.fixture
def small_cfg():
    """The default experiment, shortened: 2 seeds, schedule stretched to 200 steps."""
    return experiments.load("anchored", ["train.seeds=2", "train.steps=200", "train.checkpoint_every=50",
                                         "train.snapshot_every=50"])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tests run two at a time (xdist); keep each on one core
