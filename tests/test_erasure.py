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
