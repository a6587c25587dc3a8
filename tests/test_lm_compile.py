"""`train.compile`: the training forward through torch.compile gives the eager model, to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchoring import experiments, lifecycle
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.training import train_arm
from test_lm_kind import write_corpus

SIZE = ["lm.width=32", "lm.layers=4", "lm.heads=2", "lm.context=64", "lm.batch_size=8", "train.seeds=1",
        "train.steps=6", "train.checkpoint_every=100"]


def _same(a, b) -> None:
    """Two trained arms agree to float rounding: every logged value, and every weight."""
    assert a.metric_names == b.metric_names
    finite = np.isfinite(a.metrics)
    assert (finite == np.isfinite(b.metrics)).all()
    assert np.allclose(a.metrics[finite], b.metrics[finite], rtol=1e-4, atol=1e-5)
    pa, pb = a.model.state_dict(), b.model.state_dict()
    assert list(pa) == list(pb)  # the checkpointed module is the plain one, not a compiled wrapper
    # Adam divides by √v, so a rounding difference in a near-zero gradient moves a weight by up to a
    # fraction of the learning rate (3e-3 here): weights get a looser bound than the logged losses
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm-compile") / "texts")


@pytest.mark.slow
def test_compiled_training_equals_eager_and_really_compiles(corpus):
    """The anchored arm (hooks, sequence terms) trained compiled and eager: the same losses, term
    values and weights to float rounding. A compiled control arm trains first in the same process,
    as `anchoring run` does, and the anchored arm must build its own graph (a reused hook-free one
    would skip the anchoring hooks), in one piece. A silently eager run would pass the comparison,
    so the dynamo counters are checked too."""
    from torch._dynamo.utils import counters

    base = [f'text.corpus="{corpus}"', "text.coverage=1.0", *SIZE]
    eager = experiments.load("lm-anchor", base)
    data = load_data(eager.text)
    torch._dynamo.reset()
    counters.clear()
    a = train_arm(eager, data, 0, "anchored")
    assert not counters["stats"]["unique_graphs"]
    compiled = experiments.load("lm-anchor", [*base, "train.compile=true"])
    train_arm(compiled, data, 0, "control")
    after_control = counters["stats"]["unique_graphs"]
    assert after_control >= 1
    b = train_arm(compiled, data, 0, "anchored")
    assert counters["stats"]["unique_graphs"] > after_control
    assert not counters["graph_break"]
    _same(a, b)
    terms = [t.name for t in eager.terms]  # the terms' value columns (the schedule's weight columns come first)
    assert terms and all(np.abs(a.metrics[:, a.metric_names.index(t)]).max() > 0 for t in terms)


@pytest.mark.slow
def test_the_baseline_arms_train_the_same_model_compiled(corpus):
    """Routing's per-step mask on the MLPs goes through the compiled graph; SGTM (two backward passes
    through one graph, which the compiled graph got wrong) trains eager, so it is bit-identical."""
    from torch._dynamo.utils import counters

    base = [f'text.corpus="{corpus}"', "text.coverage=1.0", *SIZE, 'lm.arms=["control","anchored","sgtm","routing"]']
    eager = experiments.load("lm-anchor", base)
    compiled = experiments.load("lm-anchor", [*base, "train.compile=true"])
    data = load_data(eager.text)
    counters.clear()
    _same(train_arm(eager, data, 0, "routing"), train_arm(compiled, data, 0, "routing"))
    assert counters["stats"]["unique_graphs"] >= 1
    a, b = train_arm(eager, data, 0, "sgtm"), train_arm(compiled, data, 0, "sgtm")
    assert np.array_equal(a.metrics, b.metrics, equal_nan=True)


def test_without_a_cpp_compiler_compile_is_a_one_line_error_before_the_run_exists(corpus, tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config

    cfg = experiments.load("lm-anchor", [f'text.corpus="{corpus}"', *SIZE, "train.compile=true"])
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler-anywhere",))
    with pytest.raises(AnchoringError, match="needs a C\\+\\+ compiler") as err:
        lifecycle.run(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
