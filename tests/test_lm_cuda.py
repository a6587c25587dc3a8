"""The LM kind on a GPU: `train.device = "auto"` trains on CUDA, gives the CPU's model up to float
tolerance, still anchors, and data-parallel ranks on CUDA give the single-process model.

Skipped where no CUDA device is present (CI and the development machine are CPU-only); on a GPU
machine run them with `pytest -m cuda`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from anchoring import experiments, lifecycle
from anchoring.kinds.lm.distributed import backend
from anchoring.kinds.lm.training import device_of
from test_lm_kind import SPANS_SCHEDULE, tiny, write_corpus

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPANS = ['terms.0.site="blocks.1"', 'terms.1.site="blocks.1"']


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm-cuda") / "texts", files=2, paragraphs=80)


def spans(corpus, *extra: str) -> list[str]:
    return [o for o in tiny(corpus, "evaluate.shade_passages=0", *extra) if not o.startswith("terms.")] + SPANS


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-3), (k, float((a[k] - b[k]).abs().max()))


def test_auto_trains_on_cuda_and_gives_the_cpu_model(corpus, tmp_path):
    base = spans(corpus, "train.steps=8", 'lm.arms=["anchored","control"]')
    gpu = experiments.load("lm-anchor", [*base, 'train.device="auto"'])
    assert device_of(gpu).type == "cuda"
    on_gpu = lifecycle.run(gpu, tmp_path / "gpu")
    assert on_gpu.summary["timing"]["device"].startswith("cuda (")  # the summary says where it trained
    on_cpu = lifecycle.run(experiments.load("lm-anchor", base), tmp_path / "cpu")
    # checkpoints are written from CPU copies, so a CUDA run opens anywhere
    close(load_file(str(tmp_path / "gpu" / "checkpoint.safetensors")), load_file(str(tmp_path / "cpu" / "checkpoint.safetensors")),
          atol=1e-3)
    for g, c in zip(on_gpu.summary["models"], on_cpu.summary["models"]):
        assert g["arm"] == c["arm"] and g["loss"]["all"] == pytest.approx(c["loss"]["all"], abs=2e-3)
    run = lifecycle.load_run(tmp_path / "gpu")
    assert torch.isfinite(run.loss_per_token("He drew his sword.", arm="anchored")[0]["nats"]).all()


def test_span_labels_anchor_on_cuda(corpus, tmp_path):
    """The CPU test's real effect, trained on the GPU: concept positions align far above retain and control."""
    cfg = experiments.load("lm-anchor", spans(corpus, "train.steps=300", 'lm.arms=["anchored","control"]', 'train.device="cuda"'))
    rows = {r["arm"]: r for r in lifecycle.run(cfg.model_copy(update={"schedule": SPANS_SCHEDULE}), tmp_path / "run").summary["models"]}
    a, c = rows["anchored"]["alignment"]["blocks.1"], rows["control"]["alignment"]["blocks.1"]
    assert a["margin"] > 0.3 and a["margin"] > c["margin"] + 0.25, (a, c)
    assert abs(a["containment"]) < 0.15, a


def test_two_ranks_on_cuda_equal_one_process(corpus, tmp_path):
    """NCCL where there is a GPU per rank, else gloo reducing the CUDA gradients; either way the
    same model as one process taking the whole global batch."""
    base = spans(corpus, "train.steps=8", 'lm.arms=["anchored","control"]', 'train.device="cuda"')
    cfg = experiments.load("lm-anchor", base)
    assert backend(cfg, 2) == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    lifecycle.run(cfg, tmp_path / "one")
    two = lifecycle.run(experiments.load("lm-anchor", [*base, "lm.nproc=2"]), tmp_path / "two")
    assert (two.summary["timing"]["processes"], two.summary["timing"]["parallel"]) == (2, "data-parallel ranks")
    close(load_file(str(tmp_path / "one" / "checkpoint.safetensors")), load_file(str(tmp_path / "two" / "checkpoint.safetensors")),
          atol=1e-4)
    assert (tmp_path / "two" / "arms" / "anchored-seed0.rank1.safetensors").is_file()


def test_compiled_training_on_cuda_equals_eager(corpus):
    """`train.compile` on CUDA (inductor's Triton kernels, not the C++ ones the CPU tests build):
    the anchored arm's losses, term values and weights equal the eager CUDA arm's to float rounding."""
    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.training import train_arm
    from test_lm_compile import SIZE, _same

    base = [f'text.corpus="{corpus}"', "text.coverage=1.0", *SIZE, 'train.device="cuda"']
    eager = experiments.load("lm-anchor", base)
    data = load_data(eager.text)
    _same(train_arm(eager, data, 0, "anchored"), train_arm(experiments.load("lm-anchor", [*base, "train.compile=true"]), data, 0, "anchored"))


def test_resume_on_cuda_gives_the_uninterrupted_model(corpus, tmp_path):
    """A checkpoint is read onto the CPU; its Adam moments (and fused Adam's step count) must go back
    beside the CUDA parameters, and the resumed run must equal the one never interrupted."""
    import numpy as np

    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.training import train_arm
    from test_lm_kind import Killed

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=30", 'train.device="cuda"'))
    data = load_data(cfg.text)
    full = train_arm(cfg, data, 0, "anchored", checkpoint=tmp_path / "full.safetensors")

    def kill(step: int) -> None:
        if step == 17:
            raise Killed

    with pytest.raises(Killed):
        train_arm(cfg, data, 0, "anchored", checkpoint=tmp_path / "broken.safetensors", progress=kill)
    resumed = train_arm(cfg, data, 0, "anchored", checkpoint=tmp_path / "broken.safetensors")
    # CUDA attention backward may reduce in any order, so equal up to rounding rather than bit for bit
    close(full.model.state_dict(), resumed.model.state_dict(), atol=1e-5)
    assert np.allclose(full.metrics, resumed.metrics, atol=1e-5, equal_nan=True)
