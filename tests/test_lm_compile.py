"""`train.compile`: the training forward through torch.compile gives the eager model, to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchoring import experiments
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.training import LMTask, train_arm
from test_lm_kind import write_corpus

SIZE = ["lm.width=32", "lm.layers=4", "lm.heads=2", "lm.context=32", "lm.batch_size=4", "train.seeds=1",
        "train.steps=6", "train.checkpoint_every=100"]


@pytest.mark.slow
def test_compiled_training_equals_eager_and_really_compiles(tmp_path):
    """The anchored arm (hooks, sequence terms) trained compiled and eager: the same losses, term
    values and weights to float rounding, and the compiled run did build graphs (a silently eager
    run would pass the comparison, so the dynamo counter is checked too). A compiled control arm
    trains first in the same process, as `anchoring run` does: its hook-free graph must not be
    reused by the anchored arm."""
    from torch._dynamo.utils import counters

    corpus = write_corpus(tmp_path / "texts")
    base = [f'text.corpus="{corpus}"', "text.coverage=0.5", *SIZE]
    eager = experiments.load("lm-anchor", base)
    data = load_data(eager.text)
    torch._dynamo.reset()
    counters.clear()
    a = train_arm(eager, data, 0, "anchored")
    assert not counters["stats"]["unique_graphs"]
    compiled = experiments.load("lm-anchor", [*base, "train.compile=true"])
    train_arm(compiled, data, 0, "control")  # a graph without hooks first: the anchored arm must not reuse it
    b = train_arm(compiled, data, 0, "anchored")
    assert counters["stats"]["unique_graphs"] >= 2
    assert a.metric_names == b.metric_names
    finite = np.isfinite(a.metrics)
    assert (finite == np.isfinite(b.metrics)).all()
    assert np.allclose(a.metrics[finite], b.metrics[finite], rtol=1e-4, atol=1e-5)
    term = a.metric_names.index("anchor")
    assert np.abs(a.metrics[:, term]).max() > 0  # the anchor term is live, so the hooks were exercised
    pa, pb = a.model.state_dict(), b.model.state_dict()
    assert list(pa) == list(pb)  # the checkpointed module is the plain one, not a compiled wrapper
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-4


def test_without_a_cpp_compiler_compile_is_a_one_line_error(tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config

    corpus = write_corpus(tmp_path / "texts")
    cfg = experiments.load("lm-anchor", [f'text.corpus="{corpus}"', *SIZE, "train.compile=true"])
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler-anywhere",))
    with pytest.raises(AnchoringError, match="needs a C\\+\\+ compiler") as err:
        LMTask(cfg, load_data(cfg.text), 0, "control")
    assert "\n" not in str(err.value)
