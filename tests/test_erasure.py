"""Post-hoc baselines: the difference of means points at the concept; LEACE leaves no linear trace."""

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from anchoring.control.erasure import leace, mean_difference


def _data(n=2000, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).float()
    concept = torch.zeros(d)
    concept[2], concept[5] = 2.0, -1.0
    acts = torch.randn(n, d, generator=g) + labels[:, None] * concept
    return acts, labels, concept


def test_difference_of_means_finds_the_concept_direction():
    acts, labels, concept = _data()
    assert torch.nn.functional.cosine_similarity(mean_difference(acts, labels), concept, dim=0) > 0.95


def test_leace_removes_every_linear_trace_of_the_concept():
    acts, labels, _ = _data()
    before = cross_val_score(LogisticRegression(max_iter=500), acts.numpy(), labels.numpy(), cv=3).mean()
    erased = leace(acts, labels)(acts)
    after = cross_val_score(LogisticRegression(max_iter=500), erased.numpy(), labels.numpy(), cv=3).mean()
    majority = max(labels.mean().item(), 1 - labels.mean().item())
    assert before > 0.85 and after < majority + 0.03, (before, after, majority)
    centred = erased - erased.mean(0)
    assert (centred.T @ (labels - labels.mean())).abs().max() < 1e-3 * len(labels)  # no covariance with the label


def test_leace_still_erases_a_rare_label_with_a_small_mean_gap():
    """1% positives shifted by 0.3 along one axis (what span labels give): the class means must
    coincide after erasure. With the package's default svd_tol the eraser was the identity here."""
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(20000, 16, generator=g, dtype=torch.float64)
    labels = (torch.rand(20000, generator=g) < 0.01).double()
    acts[:, 0] += 0.3 * labels
    gap = lambda x: (x[labels.bool()].mean(0) - x[~labels.bool()].mean(0)).norm().item()  # noqa: E731
    assert gap(acts) > 0.2
    erased = leace(acts, labels)(acts)
    assert gap(erased) < 1e-6 and (erased - acts).norm(dim=-1).mean() > 1e-3
