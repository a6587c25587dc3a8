"""Routing labelled positions' gradients through the anchor (anchor.route)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anchoring.anchor.route import RouteThrough, route_along
from anchoring.errors import AnchoringError


def test_route_along_keeps_values_and_passes_only_the_axis_gradient_where_masked():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, requires_grad=True)
    basis = torch.linalg.qr(torch.randn(6, 2))[0].T  # two orthonormal rows
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    out = route_along(h, basis, mask)
    assert torch.equal(out, h)  # forward values untouched, bit for bit
    g = torch.randn_like(h)
    (out * g).sum().backward()
    proj = (g @ basis.T) @ basis
    assert torch.allclose(h.grad[mask], proj[mask], atol=1e-6)  # labelled: only the span's component
    assert torch.allclose(h.grad[~mask], g[~mask])              # unlabelled: the whole gradient
    assert (g[mask] - proj[mask]).norm() > 1.0                   # the removed part was not negligible


def test_route_through_hooks_limit_what_labelled_positions_teach_earlier_layers():
    """A layer before the site learns from a labelled position only through the axis: when the head
    ignores the axis, a loss at that position gives the layer no gradient, while a term that reads the
    site through a hook registered first (as `Capture` is) still does."""
    torch.manual_seed(1)
    first, site, head = nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 3)
    model = nn.Sequential(first, site, head)
    with torch.no_grad():
        head.weight[:, 0] = 0.0  # the head reads nothing along the axis
    x = torch.randn(1, 3, 4)
    axis = torch.tensor([1.0, 0.0, 0.0, 0.0])
    recorded: list[torch.Tensor] = []
    site.register_forward_hook(lambda m, i, o: recorded.append(o))

    def grad_of_first(loss_of) -> float:
        model.zero_grad()
        recorded.clear()
        loss_of(model(x)).backward()
        return float(first.weight.grad.abs().sum())

    assert grad_of_first(lambda y: (y[0, 0] ** 2).sum()) > 0  # unrouted: position 0 teaches `first`
    with RouteThrough(model, ["1"], [axis]) as route:
        route.mask = torch.tensor([[True, False, False]])
        assert grad_of_first(lambda y: (y[0, 0] ** 2).sum()) == 0  # routed: nothing reaches `first`
        assert grad_of_first(lambda y: (y[0, 1] ** 2).sum()) > 0  # an unlabelled position still teaches it
        assert grad_of_first(lambda y: (recorded[0][0, 0, 1:] ** 2).sum()) > 0  # a term on the site is not routed
        route.mask = None
        assert grad_of_first(lambda y: (y[0, 0] ** 2).sum()) > 0  # no mask: pass-through
    assert grad_of_first(lambda y: (y[0, 0] ** 2).sum()) > 0  # hooks removed on exit


def test_a_repeated_direction_routes_along_that_direction_only():
    """QR of [e0, e0] returns two orthonormal columns, so the route also let gradients through along an
    arbitrary second direction (a concept with `dims = [3, 3]` reached it)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    route = RouteThrough(model, ["0"], [e0, e0, 2 * e0])
    assert route.basis.shape == (1, 4) and torch.allclose(route.basis[0].abs(), e0)
    h = torch.randn(1, 1, 4, requires_grad=True)
    out = route_along(h, route.basis, torch.ones(1, 1, dtype=torch.bool))
    (out * e1).sum().backward()
    assert float(h.grad.abs().sum()) == 0  # nothing passes along e1
    assert RouteThrough(model, ["0"], [e0, e1, e0 + e1]).basis.shape == (2, 4)
    with pytest.raises(AnchoringError, match="at least one non-zero direction"):
        RouteThrough(model, ["0"], [torch.zeros(4)])


def test_a_batch_labelled_everywhere_is_routed_everywhere():
    torch.manual_seed(1)
    first, site, head = nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 3)
    model = nn.Sequential(first, site, head)
    with torch.no_grad():
        head.weight[:, 0] = 0.0  # the head reads nothing along the axis: routed positions teach `first` nothing
    x = torch.randn(1, 3, 4)
    with RouteThrough(model, ["1"], [torch.tensor([1.0, 0.0, 0.0, 0.0])]) as route:
        route.mask = torch.ones(1, 3, dtype=torch.bool)
        model(x).pow(2).sum().backward()
    assert float(first.weight.grad.abs().sum()) == 0
