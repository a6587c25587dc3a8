import math

import pytest
import torch
from torch.func import vmap

from anchoring.anchor import Concept, build_term
from anchoring.anchor import regularizers as R
from anchoring.domains.colour import get_labeller
from anchoring.errors import AnchoringError


def grad_of(fn, z):
    z = z.clone().requires_grad_(True)
    fn(z).sum().backward()
    return z.grad


def test_anchor_value_and_gradient():
    v = torch.tensor([2.0, 0.0])  # not unit: the term normalises it
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert torch.allclose(R.anchor(z, v), torch.tensor([0.0, 1.0, 2.0]))
    # d(1 - z·v̂/|z|)/dz at z=(0,3): -(v̂ - cos·ẑ)/|z| = (-1/3, 0)
    assert torch.allclose(grad_of(lambda t: R.anchor(t, v), z[1:2]), torch.tensor([[-1 / 3, 0.0]]))


def test_anchor_pulls_towards_the_direction_it_is_given_not_an_axis():
    """Every shipped config anchors on axis 0, so a formula that ignored its direction would pass them all."""
    v = torch.tensor([1.0, 1.0, 0.0])
    z = torch.tensor([[3.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(R.anchor(z, v), torch.tensor([0.0, 1 - 1 / math.sqrt(2), 1.0]), atol=1e-6)
    assert torch.allclose(R.anti_anchor(z, v), torch.tensor([1.0, 1 / math.sqrt(2), 0.0]), atol=1e-6)
    term = build_term("anchor", "w", latent_dim=3, concept=Concept("c", None), direction=[0.0, 0.0, 2.0])
    assert torch.allclose(term({"latent": z}, {"c": torch.ones(3)}), R.anchor(z, torch.tensor([0.0, 0.0, 1.0])).mean())


def test_subspace_and_anti_subspace():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert R.subspace(z, (0, 1)).item() == 9.0
    assert torch.equal(grad_of(lambda t: R.subspace(t, (0, 1)), z), torch.tensor([[0.0, 0.0, 6.0]]))
    assert R.anti_subspace(z, (0, 1)).item() == 5.0
    assert torch.equal(grad_of(lambda t: R.anti_subspace(t, (0, 1)), z), torch.tensor([[2.0, 4.0, 0.0]]))


def test_anti_anchor_is_one_sided():
    u = torch.tensor([1.0, 0.0])
    z = torch.tensor([[1.0, 1.0], [-1.0, 0.5]])
    assert torch.allclose(R.anti_anchor(z, u), torch.tensor([1 / math.sqrt(2), 0.0]))
    g = grad_of(lambda t: R.anti_anchor(t, u), z)
    assert torch.equal(g[1], torch.zeros(2))  # far hemisphere: no push at all
    assert g[0, 0] > 0


def test_separation_shifted_and_plain():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # 0 and 1 collide, 2 is orthogonal
    p = 2.0
    got = R.separation(z, power=p, shift=True)
    # pair terms: (1+1)/2=1 for the colliding pair, (1+0)/2=0.5 for orthogonal ones
    assert torch.allclose(got, torch.tensor([1 + 0.25, 1 + 0.25, 0.25 + 0.25]))
    plain = R.separation(z, power=p, shift=False)
    assert torch.allclose(plain, torch.tensor([1.0, 1.0, 0.0]))
    # high power: only near-collisions matter
    assert R.separation(z, power=100.0)[2].item() < 1e-25
    # gradient pushes the colliding pair apart in angle, not in length
    g = grad_of(lambda t: R.separation(t, power=p), torch.tensor([[1.0, 0.1], [1.0, -0.1]]))
    assert g[0, 1] < 0 < g[1, 1]


def test_unitarity_repulsion_euclidean_anchor():
    z = torch.tensor([[3.0, 4.0]])
    assert R.unitarity(z).item() == 16.0
    assert torch.allclose(grad_of(R.unitarity, z), torch.tensor([[4.8, 6.4]]))
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert torch.allclose(R.euclidean_repulsion(pts, eps=0.5), torch.tensor([1 / 4.5, 1 / 4.5]))
    assert R.euclidean_anchor(z, torch.tensor([3.0, 0.0])).item() == 16.0


def test_leading_dims_are_free():
    z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    v = torch.tensor([1.0, 0, 0, 0])
    for fn in (lambda t: R.separation(t, 10.0), lambda t: R.anchor(t, v), R.unitarity, R.euclidean_repulsion):
        batched = fn(z)
        assert batched.shape == (3, 5)
        assert torch.allclose(batched, torch.stack([fn(zi) for zi in z]))


def red_concept():
    return Concept("red", get_labeller("red"), anchor=(1.0, 0.0, 0.0, 0.0))


def test_term_averages_over_labelled_samples_only():
    term = build_term("anchor", "anchor", latent_dim=4, concept=red_concept())
    z = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]])
    acts = {"latent": z}
    assert term(acts, {"red": torch.tensor([0.0, 1.0, 1.0])}).item() == pytest.approx(1.5)  # mean of 1 and 2
    assert term(acts, {"red": torch.zeros(3)}).item() == 0.0  # no labels: exactly zero
    anti = build_term("anti-subspace", "w", latent_dim=4, concept=red_concept(), select="unlabelled", dims=[1])
    assert anti(acts, {"red": torch.tensor([0.0, 1.0, 0.0])}).item() == 0.0  # only sample 1 has dim 1, and it is labelled
    every = build_term("anti-subspace", "w", latent_dim=4, dims=[1])
    assert every(acts, {}).item() == pytest.approx(1 / 3)
    # under vmap (ensemble of 2 members with different labels)
    zz = torch.stack([z, z])
    lab = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = vmap(lambda a, lb: term({"latent": a}, {"red": lb}))(zz, lab)
    assert torch.allclose(out, torch.tensor([1.0, 0.0]))


def test_build_term_validates():
    with pytest.raises(AnchoringError, match="unknown regularizer 'anchr'"):
        build_term("anchr", "w", latent_dim=4)
    with pytest.raises(AnchoringError, match="direction has 3 entries"):
        build_term("anchor", "w", latent_dim=4, direction=[1, 0, 0])
    with pytest.raises(AnchoringError, match="dims"):
        build_term("subspace", "w", latent_dim=4, dims=[0, 7])
    with pytest.raises(AnchoringError, match="needs a direction"):
        build_term("anti-anchor", "w", latent_dim=4)
    with pytest.raises(AnchoringError, match="do not apply"):
        build_term("anchor", "w", latent_dim=4, concept=red_concept(), power=3)
    with pytest.raises(AnchoringError, match="needs a concept"):
        build_term("subspace", "w", latent_dim=4, dims=[0], select="labelled")
    with pytest.raises(AnchoringError, match="select='unlabeled' is not one of labelled, unlabelled, all"):
        build_term("anti-subspace", "w", latent_dim=4, concept=red_concept(), dims=[0], select="unlabeled")


def test_labels_of_another_shape_than_the_samples_are_one_error():
    """(N, 1) labels against N samples used to broadcast into an (N, N) product and a vector loss."""
    t = build_term("anchor", "w", latent_dim=4, concept=red_concept(), direction=[1, 0, 0, 0])
    z = torch.randn(8, 4)
    assert t({"latent": z}, {"red": torch.ones(8)}).shape == ()
    with pytest.raises(AnchoringError, match=r"labels of shape \(8, 1\) do not match the \(8,\) samples of 'latent'"):
        t({"latent": z}, {"red": torch.ones(8, 1)})
    for bad in (torch.ones(7), torch.ones(1), torch.tensor(1.0)):  # too few: torch's error, or a sum instead of a mean
        with pytest.raises(AnchoringError, match="one label per sample"):
            t({"latent": z}, {"red": bad})
    with pytest.raises(AnchoringError, match="one label per sample"):
        t({"latent": torch.randn(3, 8, 4)}, {"red": torch.ones(3, 1)})
    assert t({"latent": torch.randn(3, 8, 4)}, {"red": torch.ones(8)}).shape == (3,)  # shared labels broadcast over members


@pytest.mark.parametrize("p", [1.0, 2.5, 10.0, 100.0])
def test_cheap_pow_backward_matches_finite_differences(p):
    from anchoring.anchor.regularizers import _pow

    # cosines shifted into [0, 1], as the separation term feeds them; away from 0 so x^p is not tiny
    x = (0.5 + 0.45 * torch.rand(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _pow(t, p), (x,), eps=1e-7, atol=1e-6, rtol=1e-4)
    y = torch.rand(4, dtype=torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(_pow(y, p).sum(), y)
    assert torch.allclose(g, p * y.detach() ** (p - 1))
