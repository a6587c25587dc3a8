"""Distilling an edited LM into a fresh or noised copy (`kinds.lm.distil`): the student starts where the
noise says, learns the teacher's outputs, and the teacher is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from anchoring.control.relearn import finetune
from anchoring.kinds.lm import distil
from anchoring.models import NormalizedTransformer


def model(seed: int) -> NormalizedTransformer:
    torch.manual_seed(seed)
    return NormalizedTransformer(11, 16, 2, 2, 16).eval()


def test_noise_one_starts_from_the_fresh_model_and_less_noise_stays_nearer_the_teacher():
    teacher, fresh = model(0), model(1)
    kept = copy.deepcopy(teacher.state_dict())
    full, some = distil.noised(teacher, fresh, 1.0), distil.noised(teacher, fresh, 0.2)
    for (name, p), q, t, s in zip(full.named_parameters(), fresh.parameters(), teacher.parameters(), some.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name  # fresh weights are already on the sphere
        if not torch.equal(t, q):  # (scales start at the same constant in every model)
            assert (s - t).norm() < (s - q).norm(), name
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in kept.items())  # the teacher untouched
    w = some.blocks[0].attn.q.weight  # moved, and back on the sphere
    assert torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)
    assert all(p.requires_grad for p in some.parameters())


def test_the_fresh_model_is_the_same_each_time_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    a = distil.fresh_model(lambda: model_no_seed(), 0)
    after = torch.rand(3)
    b = distil.fresh_model(lambda: model_no_seed(), 0)
    c = distil.fresh_model(lambda: model_no_seed(), 1)
    assert torch.equal(before, after)
    assert torch.equal(a.embed.weight, b.embed.weight) and not torch.equal(a.embed.weight, c.embed.weight)


def model_no_seed() -> NormalizedTransformer:
    return NormalizedTransformer(11, 16, 2, 2, 16)


def test_distillation_brings_the_student_to_the_teachers_outputs_and_leaves_the_teacher():
    teacher, fresh = model(0), model(1)
    kept = copy.deepcopy(teacher.state_dict())
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 11, (60, 8, 9), generator=g)
    held = torch.randint(0, 11, (16, 8), generator=g)
    student = distil.noised(teacher, fresh, 1.0)
    with torch.no_grad():
        start = float(distil.distillation_loss(student, teacher, held))
    out = distil.distilled(teacher, student, lambda step: data[step], 60, 1e-2)
    with torch.no_grad():
        end = float(distil.distillation_loss(out, teacher, held))
    assert end < 0.3 * start, (start, end)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in kept.items())


def test_the_rate_warms_up_from_1e4_stays_flat_and_ends_at_a_tenth():
    lr, steps = 3e-3, 1000
    shares = [distil.rate(s, steps, lr) for s in range(steps)]
    assert shares[0] * lr == pytest.approx(1e-4)
    assert shares[50] == 1.0 and shares[799] == 1.0
    assert shares[-1] == pytest.approx(0.1, abs=0.01)
    assert shares[:50] == sorted(shares[:50]) and shares[800:] == sorted(shares[800:], reverse=True)
    assert distil.rate(0, steps, 1e-5) == 1.0  # a peak under 1e-4: no warm-up above it


def test_a_fine_tune_follows_its_rate_schedule():
    """`rate` scales the rate step by step: a schedule at zero leaves the weights where they were."""
    m = model(0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 11, (5, 4, 9), generator=g)

    def loss(x, step):
        return torch.nn.functional.cross_entropy(x(data[step][:, :-1]).flatten(0, 1), data[step][:, 1:].flatten())

    held, moved = [], []
    finetune(m, loss, lambda x: held.append(copy.deepcopy(x.state_dict())) or {}, 3, 1e-2, rate=lambda step: 0.0)
    finetune(m, loss, lambda x: moved.append(copy.deepcopy(x.state_dict())) or {}, 3, 1e-2)
    gap = lambda after: max(float((after[k] - v).abs().max()) for k, v in m.state_dict().items())  # noqa: E731
    assert gap(held[-1]) < 1e-6 < 1e-3 < gap(moved[-1])  # (putting weights back on the sphere moves the last bits)
