"""The normalised transformer's invariants, position selectors and mellowmax pooling."""

import pytest
import torch
import torch.nn.functional as F

from anchoring.anchor import Capture
from anchoring.anchor.sequence import Positions, SequenceSite, pool_lines, soft_minimum
from anchoring.domains.colour_language import ROLE
from anchoring.errors import AnchoringError
from anchoring.models import NormalizedTransformer


def test_weights_and_residual_stream_stay_on_the_sphere_after_a_step():
    torch.manual_seed(0)
    m = NormalizedTransformer(30, width=32, layers=2, heads=4, context=16)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = torch.randint(30, (4, 16))
    loss = F.cross_entropy(m(x).flatten(0, 1), torch.randint(30, (64,)))
    loss.backward()
    opt.step()
    assert (m.embed.weight.norm(dim=1) - 1).abs().max() > 1e-3  # the step moved rows off the sphere…
    m.normalize_weights()
    ones = lambda t: torch.allclose(t, torch.ones_like(t), atol=1e-5)  # noqa: E731
    assert ones(m.embed.weight.norm(dim=1)) and ones(m.unembed.weight.norm(dim=1))  # …and this puts them back
    for b in m.blocks:
        assert ones(b.attn.q.weight.norm(dim=1)) and ones(b.mlp.up.weight.norm(dim=1))
        assert ones(b.attn.o.weight.norm(dim=0)) and ones(b.mlp.down.weight.norm(dim=0))
    with Capture(m, ["blocks.0", "blocks.1", "blocks.1.attn.q_site"]) as cap:
        m(x)
        for site in ("blocks.0", "blocks.1"):
            assert ones(cap.acts[site].norm(dim=-1))
        assert cap.acts["blocks.1.attn.q_site"].shape == (4, 4, 16, 8)
        assert ones(cap.acts["blocks.1.attn.q_site"].norm(dim=-1))


def test_the_models_unit_normalisation_matches_f_normalize_in_value_gradient_and_under_vmap():
    from anchoring.models.ngpt import _unit

    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_unit, (x,))  # the hand-written backward is the true derivative
    g = torch.randn(3, 5, 8, dtype=torch.double)
    (mine,) = torch.autograd.grad(_unit(x), x, g)
    (ref,) = torch.autograd.grad(F.normalize(x, dim=-1), x, g)
    assert torch.allclose(_unit(x), F.normalize(x, dim=-1)) and torch.allclose(mine, ref)
    assert torch.allclose(torch.func.vmap(_unit)(x), F.normalize(x, dim=-1))
    (first,) = torch.autograd.grad(_unit(x), x, g, create_graph=True)
    with pytest.raises(RuntimeError):  # no silent second derivative
        torch.autograd.grad(first.sum(), x)


def test_attention_is_causal():
    torch.manual_seed(0)
    m = NormalizedTransformer(30, width=32, layers=2, heads=4, context=16).eval()
    x = torch.randint(30, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 30
    with torch.no_grad():
        assert torch.allclose(m(x)[0, :10], m(y)[0, :10], atol=1e-5)
        assert not torch.allclose(m(x)[0, 10:], m(y)[0, 10:], atol=1e-3)


def test_soft_minimum_lies_between_min_and_mean_and_its_gradient_weights_are_a_distribution():
    losses = torch.tensor([[0.9, 0.1, 0.5, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    out = soft_minimum(losses, mask, omega=10.0)
    assert 0.1 <= out.item() <= losses[0, :3].mean().item()
    (grad,) = torch.autograd.grad(out.sum(), losses)
    assert bool((grad >= 0).all()) and float(grad[0, 3]) == 0.0
    assert torch.allclose(grad.sum(), torch.tensor(1.0))
    assert int(grad[0].argmax()) == 1  # most of the pull goes to the position closest already
    sharp = soft_minimum(losses.detach(), mask, omega=1e4)
    assert abs(float(sharp) - 0.1) < 1e-3
    assert float(soft_minimum(losses.detach(), torch.zeros_like(mask), 10.0)) == 0.0


def test_pool_lines_averages_labelled_lines_only():
    ell = torch.tensor([[0.2, 0.8, 0.5, 0.5, 1.0, 1.0]])
    line = torch.tensor([[0, 0, 1, 1, 2, 2]])
    none = pool_lines(ell, line, torch.zeros(1, 3), 50.0)
    assert float(none) == 0.0
    one = pool_lines(ell, line, torch.tensor([[1.0, 0.0, 0.0]]), 50.0)
    assert 0.2 <= float(one) < 0.25
    two = pool_lines(ell, line, torch.tensor([[1.0, 1.0, 0.0]]), 50.0)
    assert abs(float(two) - (float(one) + 0.5) / 2) < 1e-6


def test_pool_lines_charges_each_unlabelled_line_for_its_worst_position():
    ell = torch.tensor([[0.2, 0.8, 0.5, 0.5, 0.0, 1.0]], requires_grad=True)
    line = torch.tensor([[0, 0, 1, 1, 2, 2]])
    labels = torch.tensor([[1.0, 0.0, 0.0]])  # line 0 labelled: ignored on this side
    worst = pool_lines(ell, line, labels, 200.0, select="unlabelled")
    assert abs(float(worst) - (0.5 + 1.0) / 2) < 0.01  # soft max of line 1 (0.5) and of line 2 (1.0)
    worst.backward()
    assert float(ell.grad[0, :2].abs().sum()) == 0.0  # the labelled line gets no push
    assert float(ell.grad[0, 5]) > 0.49 and float(ell.grad[0, 4]) < 1e-6  # line 2's push lands on its worst position
    mean_like = pool_lines(ell.detach(), line, labels, 1e-4, select="unlabelled")
    assert abs(float(mean_like) - (0.5 + 0.5) / 2) < 1e-3  # small ω: the mean of each line


def test_position_selectors_parse_and_reject_bad_input():
    assert Positions.parse("all", ROLE).kind == "all"
    assert Positions.parse("slot:a", ROLE).role == ROLE["a"]
    assert Positions.parse("mellowmax:5", ROLE).omega == 5.0
    for bad, msg in (("slot:z", "unknown slot"), ("mellowmax:x", "number"), ("mellowmax:-1", "positive"),
                     ("mellowmax:inf", "up to 1e6"), ("mellowmax:1e39", "up to 1e6"), ("mellowmax:nan", "positive"), ("every", "unknown")):
        with pytest.raises(AnchoringError, match=msg):
            Positions.parse(bad, ROLE)


def test_sites_read_a_head_of_per_head_outputs():
    acts = {"q": torch.randn(2, 4, 5, 8), "h": torch.randn(2, 5, 16)}
    assert torch.equal(SequenceSite("q", 2).read(acts), acts["q"][:, 2])
    assert SequenceSite("h").read(acts).shape == (2, 5, 16)
    with pytest.raises(AnchoringError, match="name a head"):
        SequenceSite("q").read(acts)
    with pytest.raises(AnchoringError, match="no head 4"):
        SequenceSite("q", 4).read(acts)


def test_pooling_unlabelled_lines_averages_only_the_lines_present():
    per = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    line = torch.tensor([[0, 0, 1, 1]])  # line 2 is not in this row
    assert float(pool_lines(per, line, torch.zeros(1, 3), 10.0, "unlabelled")) == pytest.approx(2.0)


def test_a_sequence_term_averages_over_its_slot_and_its_selected_positions():
    from anchoring.anchor.sequence import SequenceTerm

    h = torch.arange(1.0, 7.0).view(1, 6, 1)
    roles = torch.tensor([[ROLE["a"], ROLE["op"], ROLE["b"], ROLE["a"], ROLE["op"], ROLE["b"]]])
    line = torch.tensor([[0, 0, 0, 1, 1, 1]])
    lab = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])

    def term(positions, select):
        return SequenceTerm("t", "anchor", "w", SequenceSite("s"), lambda x: x[..., 0], positions, "c", select)

    slot = term(Positions("slot", role=ROLE["a"]), "all")({"s": h}, roles, line, {"c": torch.ones(1, 2)})
    assert float(slot) == pytest.approx((1 + 4) / 2)
    calm = term(Positions("all"), "unlabelled")({"s": h}, roles, line, {"c": torch.ones(1, 2)}, {"c": lab})
    assert float(calm) == pytest.approx((3 + 4 + 6) / 3)
    for bad in ({"c": torch.full((1, 2), 2.0)}, {"c": -torch.ones(1, 2)}):  # line labels out of [0, 1], either path
        with pytest.raises(AnchoringError, match="must lie in \\[0, 1\\]"):
            term(Positions("all"), "labelled")({"s": h}, roles, line, bad)
        with pytest.raises(AnchoringError, match="must lie in \\[0, 1\\]"):
            term(Positions("mellowmax", omega=3.0), "labelled")({"s": h}, roles, line, bad)
