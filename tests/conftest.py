import pytest
import torch

from anchoring import experiments


@pytest.fixture
def small_cfg():
    """The default experiment, shortened: 2 seeds, schedule stretched to 200 steps."""
    return experiments.load("anchored", ["train.seeds=2", "train.steps=200", "train.checkpoint_every=50",
                                         "train.snapshot_every=50"])


# Tests run two at a time (pytest -n 2 on 2 cores): one thread each, set before any fixture
# trains, or OpenMP workers of the two processes fight over the cores.
torch.set_num_threads(1)


def _train_once(tmp_path_factory, experiment, seeds):
    from typer.testing import CliRunner

    from anchoring.cli import app

    out = tmp_path_factory.mktemp(experiment) / "run"
    r = CliRunner().invoke(app, ["run", experiment, "--seeds", str(seeds), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    return out, r.stdout


@pytest.fixture(scope="session")
def anchored_run(tmp_path_factory):
    """The default experiment at full length, 3 seeds (shared by the end-to-end tests)."""
    return _train_once(tmp_path_factory, "anchored", 3)


@pytest.fixture(scope="session")
def isolated_run(tmp_path_factory):
    return _train_once(tmp_path_factory, "isolated", 2)
