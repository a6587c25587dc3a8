"""Gradient masks: the labelled loss reaches only masked entries; the rest reaches everything."""

import torch
from torch import nn

from anchoring.train.masking import masked_backward, zero_entries


def test_labelled_gradients_land_only_where_the_mask_says():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    params = dict(net.named_parameters())
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:2] = True  # two hidden units are the "forget" entries of the first layer
    x_lab, x_rest = torch.randn(5, 4), torch.randn(7, 4)
    labelled, rest = net(x_lab).pow(2).sum(), net(x_rest).pow(2).sum()
    masked_backward(labelled, rest, params, {"0.weight": mask})
    got = {n: p.grad.clone() for n, p in params.items()}
    g_rest = torch.autograd.grad(net(x_rest).pow(2).sum(), list(params.values()))
    g_lab = torch.autograd.grad(net(x_lab).pow(2).sum(), list(params.values()))
    for (name, _), gr, gl in zip(params.items(), g_rest, g_lab):
        expected = gr + (gl * mask if name == "0.weight" else 0.0)
        assert torch.allclose(got[name], expected, atol=1e-6), name
    # labelled data alone: only the masked entries move
    net.zero_grad(set_to_none=True)
    masked_backward(net(x_lab).pow(2).sum(), torch.zeros((), requires_grad=True) * 0 + net(x_rest).sum() * 0,
                    params, {"0.weight": mask})
    assert (params["0.weight"].grad[~mask] == 0).all() and (params["0.weight"].grad[mask] != 0).any()
    assert all((params[n].grad == 0).all() for n in ("0.bias", "2.weight", "2.bias"))


def test_a_parameter_neither_loss_reaches_keeps_no_gradient():
    """As after `backward()`: no gradient means None, so Adam leaves the weight alone."""
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 1), nn.Linear(3, 1)
    params = {**{f"u.{n}": p for n, p in used.named_parameters()}, **{f"x.{n}": p for n, p in unused.named_parameters()}}
    x = torch.randn(4, 3)
    masked_backward(used(x).sum(), used(x).pow(2).sum(), params, {"x.weight": torch.ones(1, 3, dtype=torch.bool)})
    assert params["u.weight"].grad is not None
    assert params["x.weight"].grad is None and params["x.bias"].grad is None
    opt = torch.optim.Adam(unused.parameters(), lr=0.1)
    before = unused.weight.detach().clone()
    opt.step()
    assert torch.equal(unused.weight, before)


def test_zero_entries_deletes_only_the_forget_entries():
    w = nn.Parameter(torch.ones(3, 3))
    mask = torch.eye(3, dtype=torch.bool)
    zero_entries({"w": w}, {"w": mask})
    assert (w[mask] == 0).all() and (w[~mask] == 1).all()


def test_masked_gradients_add_to_what_grad_already_holds():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    params = dict(net.named_parameters())
    x = torch.randn(4, 3)
    masked_backward(net(x).sum(), net(x).pow(2).sum(), params, {"weight": torch.ones(2, 3, dtype=torch.bool)})
    once = {n: p.grad.clone() for n, p in params.items()}
    masked_backward(net(x).sum(), net(x).pow(2).sum(), params, {"weight": torch.ones(2, 3, dtype=torch.bool)})
    for n, p in params.items():
        assert torch.allclose(p.grad, 2 * once[n]), n


def test_a_frozen_parameter_is_skipped_and_one_only_the_labelled_loss_reaches_gets_its_masked_gradient():
    """A frozen weight is no error and gets no gradient; a weight that only the labelled loss reaches
    (a routed unit that retain text never uses) still learns where its mask allows."""
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    frozen = torch.ones(3)
    mask = torch.tensor([True, False, True])
    labelled, rest = (a * b * frozen).sum() * 2, (a * frozen).sum()
    masked_backward(labelled, rest, {"a": a, "b": b, "frozen": frozen}, {"b": mask})
    assert frozen.grad is None
    assert a.grad.tolist() == [1.0, 1.0, 1.0]  # ∇rest only: a has no mask
    assert b.grad.tolist() == [2.0, 0.0, 2.0]  # ∇labelled, masked
