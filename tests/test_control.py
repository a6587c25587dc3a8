
import numpy as np
import pytest
import torch
from torch import nn

from anchoring.control import (
    BezierMapper,
    BoundedPower,
    Constant,
    FalloffMapper,
    Intervention,
    Linear,
    ablate,
    ablate_direction,
    find_layout,
    intervene,
    keeping_norm,
    matched_random,
    parse_falloff,
    prune,
    repel,
    suppress,
)
from anchoring.errors import AnchoringError
from anchoring.evaluate.control import pareto_front, selectivity
from anchoring.models import ColourAutoencoder

V = torch.tensor([1.0, 0.0, 0.0, 0.0])


def unit_points(n=400, d=4, seed=0):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return z / z.norm(dim=-1, keepdim=True)


def test_suppress_is_an_exact_projection_on_the_near_hemisphere():
    z = unit_points()
    out = suppress(z, V)
    near = z[:, 0] > 0
    assert torch.allclose(out[near, 0], torch.zeros(int(near.sum())), atol=1e-6)  # concept component removed
    assert torch.allclose(out[near, 1:], z[near, 1:])  # the rest untouched
    assert torch.equal(out[~near], z[~near])  # far hemisphere (cyan for red) untouched
    assert torch.allclose(suppress(V[None], V), torch.zeros(1, 4), atol=1e-7)  # pure concept → origin


def test_keeping_norm_changes_only_the_direction_and_only_where_the_edit_acts():
    z = unit_points() * 3.0  # off the unit sphere on purpose: the old length, whatever it was
    out = keeping_norm(lambda x: suppress(x, V))(z)
    near = z[:, 0] > 0
    assert torch.equal(out[~near], z[~near])  # the edit's no-ops stay bit-identical
    assert torch.allclose(out.norm(dim=-1), z.norm(dim=-1), atol=1e-5)
    assert torch.allclose(out[near, 0], torch.zeros(int(near.sum())), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(out[near], suppress(z, V)[near], dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)  # the projection's direction
    for dtype in (torch.float32, torch.float16):  # a state on the axis has no direction left: zero, not NaN
        on_axis = keeping_norm(lambda x: suppress(x, V.to(dtype)))(V[None].to(dtype))
        assert torch.equal(on_axis, torch.zeros(1, 4, dtype=dtype))


def test_matched_random_moves_the_same_states_by_the_same_angles_but_not_off_the_concept():
    torch.manual_seed(0)
    z = torch.randn(500, 16) * 2.5
    v = torch.eye(16)[0]
    aimed = keeping_norm(lambda x: suppress(x, v))
    out = matched_random(aimed, torch.Generator().manual_seed(3))(z)
    edited = z[:, 0] > 0
    assert torch.equal(out[~edited], z[~edited])  # where the edit does nothing, neither does its control
    assert torch.allclose(out.norm(dim=-1), z.norm(dim=-1), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(out, z, dim=-1)[edited], cos(aimed(z), z, dim=-1)[edited], atol=1e-5)  # same angle
    # not aimed: the concept's share of the state shrinks only as the turn demands (cos θ of it), where
    # the aimed edit takes it to zero
    share = out[edited, 0] / out[edited].norm(dim=-1)
    assert torch.allclose(share, cos(out, z, dim=-1)[edited] * z[edited, 0] / z[edited].norm(dim=-1), atol=1e-5)
    assert (share > 0).all() and aimed(z)[edited, 0].abs().max() < 1e-6
    again = matched_random(aimed, torch.Generator().manual_seed(3))(z)
    other = matched_random(aimed, torch.Generator().manual_seed(4))(z)
    assert torch.equal(out, again) and not torch.allclose(out[edited], other[edited])
    # a state on the axis: the edit leaves nothing, and so does its control (no angle to match)
    assert torch.equal(matched_random(aimed, torch.Generator().manual_seed(3))(v[None] * 2.0), torch.zeros(1, 16))
    # small turns are matched too (no cancellation in 1 − cos²), and half precision gets float32 arithmetic
    slight = torch.cat([torch.full((64, 1), 1e-3), torch.randn(64, 15)], dim=1)
    a_slight = keeping_norm(lambda x: suppress(x, v))(slight)
    m_slight = matched_random(aimed, torch.Generator().manual_seed(5))(slight)
    turn = (slight - a_slight).norm(dim=-1)
    assert torch.allclose((slight - m_slight).norm(dim=-1), turn, rtol=1e-3) and (turn > 0).all()
    half = matched_random(aimed, torch.Generator().manual_seed(3))(z.half())
    assert half.dtype == torch.float16
    assert torch.allclose(cos(half.float(), z, dim=-1)[edited], cos(aimed(z), z, dim=-1)[edited], atol=2e-3)


def test_the_matched_random_move_of_a_subspace_edit_adds_no_concept_energy():
    """A subspace edit's displacement is one direction of the subspace per state; the random turn must
    avoid the others too, or the control pushes states into the concept it is meant to leave alone."""
    from anchoring.control import suppress_subspace

    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2000, 16), dim=-1)
    basis = torch.eye(16)[:3]
    aimed = keeping_norm(lambda x: suppress_subspace(x, basis))
    cos = torch.nn.functional.cosine_similarity
    energy = (z @ basis.T).norm(dim=-1)
    for avoid, holds in ((None, False), (basis, True)):
        out = matched_random(aimed, torch.Generator().manual_seed(7), avoid)(z)
        assert torch.allclose(cos(out, z, dim=-1), cos(aimed(z), z, dim=-1), atol=1e-5)  # same turn either way
        assert torch.allclose(out.norm(dim=-1), z.norm(dim=-1), atol=1e-5)
        # with the span avoided, the concept's component only scales like the rest of the state (cos θ)
        scaled = ((out @ basis.T) - cos(out, z, dim=-1)[:, None] * (z @ basis.T)).norm(dim=-1)
        assert bool((scaled < 1e-5).all()) == holds
        assert bool(((out @ basis.T).norm(dim=-1) <= energy + 1e-6).all()) == holds
    # the same states up to their last bits get the same control: no direction is made of rounding noise,
    # also where the turn is tiny (a concept component of 1e-5) and the displacement is mostly rounding
    slight = torch.nn.functional.normalize(torch.cat([1e-5 * torch.randn(500, 3), torch.randn(500, 13)], 1), dim=-1)
    for states in (z, slight):
        nudged = states * (1 + 1e-7 * torch.randn(len(states), 1))
        again = matched_random(aimed, torch.Generator().manual_seed(7), basis)(nudged)
        first = matched_random(aimed, torch.Generator().manual_seed(7), basis)(states)
        moved = (torch.nn.functional.normalize(again, dim=-1) - torch.nn.functional.normalize(first, dim=-1)).norm(dim=-1)
        assert moved.max() < 1e-5, float(moved.max())
    with pytest.raises(AnchoringError, match="none to spare"):  # width 4, three concept directions: no room left
        matched_random(aimed, torch.Generator(), torch.eye(4)[:3])


def test_repel_keeps_the_norm_of_states_close_to_the_axis():
    """u − cos·v cancels near the axis; in float32 the rest was rounding noise not ⟂ v, and the norm
    came out 8% off at a distance of 1e-6."""
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(8), dim=-1)
    mapper = FalloffMapper(Linear(0, 0.5))
    for eps in (1e-6, 1e-5, 1e-4):
        p = torch.randn(500, 8)
        p = torch.nn.functional.normalize(p - (p @ v)[:, None] * v, dim=-1)
        z = (v + eps * p) * 3.0
        out = repel(z, v, mapper)
        assert torch.allclose(out.norm(dim=-1), z.norm(dim=-1), rtol=1e-6), eps
        alpha = (torch.nn.functional.normalize(z, dim=-1) @ v).clamp(0, 1)
        assert torch.allclose(torch.nn.functional.normalize(out, dim=-1) @ v, mapper(alpha), atol=1e-6), eps


def test_an_edit_along_a_zero_direction_is_refused():
    with pytest.raises(AnchoringError, match="direction is zero"):
        Intervention("suppress", (0.0, 0.0, 0.0))


def test_falloff_threshold_leaves_weak_alignment_alone():
    z = unit_points()
    out = suppress(z, V, BoundedPower(a=0.5, p=2, b=1))
    weak = z[:, 0] <= 0.5
    assert torch.allclose(out[weak], z[weak], atol=1e-7)
    strong = z[:, 0] > 0.5
    assert (out[strong, 0] < z[strong, 0]).all()


def test_repel_keeps_unit_norm_and_the_orthogonal_direction():
    z = unit_points()
    mapper = FalloffMapper(Linear(a=0.0, b=1.0))
    out = repel(z, V, mapper)
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(z)), atol=1e-5)
    near = z[:, 0] > 0
    alpha = z[near, 0]
    assert torch.allclose(out[near, 0], mapper(alpha), atol=1e-5)  # new cosine is m(α)
    w_in = z[near, 1:] / z[near, 1:].norm(dim=-1, keepdim=True)
    w_out = out[near, 1:] / out[near, 1:].norm(dim=-1, keepdim=True)
    assert torch.allclose(w_in, w_out, atol=1e-5)
    assert torch.equal(out[~near], z[~near])
    on_axis = repel(V[None], V, FalloffMapper(Constant(1.0)))  # no orthogonal part: pick one, stay unit
    assert on_axis[0, 0].abs() < 1e-6 and on_axis.norm() == pytest.approx(1.0)


def test_a_named_repel_edit_uses_its_own_mapper():
    """The repel tests call `repel` directly; an `Intervention` that dropped its falloff and used the
    default mapper passed them all, and the CLI's repel run checked only that files were written."""
    z = unit_points()
    shape = BoundedPower(0.1, 2.0, 1.0)
    out = Intervention("repel", tuple(V.tolist()), shape=shape)(z)
    assert torch.allclose(out, repel(z, V, FalloffMapper(shape)), atol=1e-6)
    assert not torch.allclose(out, repel(z, V), atol=1e-3)


def test_edits_are_scored_with_the_selectivity_exponent_they_are_given():
    """Shipped configs use k = 2 or 3; an edit scored with a fixed exponent passed them within a threshold."""
    from anchoring.domains.colour import get_labeller
    from anchoring.kinds.colour.edits import concept_similarity, evaluate_edit, selectivity_grid

    def before(x):
        return x[None].expand(2, -1, -1)

    def after(x):  # two "seeds" that lose red in different amounts
        return torch.stack([x * torch.tensor([0.2, 1.0, 1.0]), x * torch.tensor([0.6, 1.0, 1.0])])

    from anchoring.anchor import Concept

    red = Concept("red", get_labeller("red"), anchor=(1.0, 0.0, 0.0, 0.0))
    sim = concept_similarity(red, selectivity_grid())
    got = {k: evaluate_edit(before, after, red, k) for k in (2.0, 3.0)}
    for k, res in got.items():
        assert torch.allclose(res["selectivity"], selectivity(res["grid_after"], sim, k))
    assert not torch.allclose(got[2.0]["selectivity"], got[3.0]["selectivity"])


def test_falloff_and_mapper_bounds():
    a = torch.linspace(0, 1, 101)
    g = BoundedPower(a=0.2, p=3, b=0.7)(a)
    assert (g >= 0).all() and (g <= 0.7 + 1e-7).all()
    assert (g[a <= 0.2] == 0).all() and g[-1] == pytest.approx(0.7)
    assert (torch.diff(g) >= -1e-7).all()
    bez = BezierMapper(0.5, 0.0, 0.9, 0.1, end=0.0)
    m = bez(a)
    assert (m <= a + 1e-7).all() and m[0] == pytest.approx(0.0, abs=1e-6) and m[-1] == pytest.approx(0.0, abs=1e-6)
    assert parse_falloff("power:0.2,2,1") == BoundedPower(0.2, 2.0, 1.0)
    assert parse_falloff("linear:0.1,0.5") == BoundedPower(0.1, 1.0, 0.5)
    for bad, msg in (("cubic:1", "unknown falloff"), ("power:x", "must be numbers"), ("power:1.5,1,1", "threshold a"),
                     ("constant:1,2", "at most 1"), ("constant:nan", "finite"), ("power:0.1,inf,0.9", "finite"),
                     ("constant:-1", "strength must be ≥ 0"),
                     ("power:1", r"reads as power:a,p,b with a=1; numbers left out keep their defaults\)"),  # not p = 1
                     ("power:1.5,1,1", r"with a=1.5, p=1, b=1\)$")):  # all three given: no word of defaults
        with pytest.raises(AnchoringError, match=msg):
            parse_falloff(bad)


def test_intervene_hook_is_scoped():
    torch.manual_seed(0)
    m = ColourAutoencoder()
    red = torch.tensor([[1.0, 0.0, 0.0]])
    before = m(red)
    with intervene(m, "latent", Intervention("zero", dims=(0, 1, 2, 3))):
        assert torch.allclose(m(red), m.decoder(torch.zeros(1, 4)))
    assert torch.equal(m(red), before)


@pytest.mark.parametrize("dims", [[0], [0, 1], [1, 3]])
def test_ablation_equals_pruning(dims):
    torch.manual_seed(1)
    m = ColourAutoencoder(latent_dim=4, hidden=(10, 10))
    x = torch.rand(256, 3)
    a, p = ablate(m, dims), prune(m, dims)
    assert p.latent_dim == 4 - len(dims) and p.encoder[-1].out_features == 4 - len(dims)
    assert (a(x) - p(x)).abs().max() < 1e-6
    assert not torch.allclose(a(x), m(x))  # it did edit something
    assert m.encoder[-1].weight.abs().sum() > 0 and torch.equal(m(x), m(x))  # original untouched


class Plain(nn.Module):
    def __init__(self, mid: nn.Module):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.mid = mid
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.mid(self.a(x)))


def test_surgery_on_a_foreign_model_and_refusals():
    torch.manual_seed(0)
    ok = Plain(nn.Identity())
    layout = find_layout(ok, "mid", torch.zeros(1, 3))
    assert (layout.producer, layout.consumer, layout.width) == ("a", "b", 4)
    x = torch.rand(5, 3)
    ablated, pruned = ablate(ok, [2], site="mid"), prune(ok, [2], site="mid")
    assert pruned.a.out_features == 3 and pruned.b.in_features == 3
    assert torch.allclose(ablated(x), pruned(x), atol=1e-6)  # the same function, one dim narrower
    assert not torch.allclose(ablated(x), ok(x))  # and it did remove something
    with pytest.raises(AnchoringError, match=r"site.s own module \(GELU\) computes its output"):
        ablate(Plain(nn.GELU()), [0], site="mid")

    class Doubled(Plain):
        def forward(self, x):
            return self.b(2 * self.mid(self.a(x)))  # consumer reads a transformed copy

    with pytest.raises(AnchoringError, match="not read directly by an nn.Linear"):
        ablate(Doubled(nn.Identity()), [0], site="mid")
    with pytest.raises(AnchoringError, match="cannot delete every latent dim"):
        ablate(ok, [0, 1, 2, 3], site="mid")
    with pytest.raises(AnchoringError, match="within 0..3"):
        prune(ok, [4], site="mid")


def test_direction_ablation_removes_that_direction():
    torch.manual_seed(0)
    m = ColourAutoencoder()
    d = torch.tensor([1.0, 1.0, 0.0, 0.0])
    edited = ablate_direction(m, d)
    z = edited.encoder(torch.rand(50, 3))
    assert (z @ (d / d.norm())).abs().max() < 1e-5


def test_selectivity_and_pareto():
    sim = torch.linspace(0, 1, 50)
    perfect = (0.3 * sim**2).expand(3, -1).clone()
    assert torch.allclose(selectivity(perfect, sim, 2.0), torch.ones(3))
    noise = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    assert (selectivity(noise, sim, 2.0) < 0.2).all()
    assert selectivity(perfect, sim, 1.0)[0] < 1.0  # wrong exponent fits worse
    spared = 0.3 - perfect  # the concept spared, everything else broken: the same fit, the wrong way round
    assert torch.allclose(selectivity(spared, sim, 2.0), -torch.ones(3))
    pts = np.array([[1, 1, 1], [0, 2, 1], [2, 2, 2], [1, 1, 0]])
    assert pareto_front(pts) == [1, 3]


def test_the_relearning_attack_measures_in_eval_mode_and_trains_in_train_mode():
    from anchoring.control.relearn import relearn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1)).eval()
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    modes = []

    def loss(m: nn.Module) -> torch.Tensor:
        modes.append(m.training)
        return ((m(x) - y) ** 2).mean()

    def error(m: nn.Module) -> torch.Tensor:
        return ((m(x) - y) ** 2).mean()

    curve = relearn(model, loss, error, steps=3)
    with torch.no_grad():
        assert float(curve.errors[0]) == float(error(model))  # dropout off: the edited model's own error, exactly
    assert modes == [True, True, True] and not model.training  # the copy trained; the given model untouched


def test_a_fine_tune_that_blows_up_stops_naming_its_step_instead_of_scoring_broken_weights():
    """The relearning attacks' loops skipped a non-finite loss: the LM table's lowest forget loss is
    Python's `min` over a curve with NaN in it, which passes the NaN by, so a broken attack read as
    a deletion that held ("kept" near 1, "not recovered")."""
    from anchoring.control.relearn import finetune
    from anchoring.train.skeleton import Diverged

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    seen: list[int] = []

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        out = ((m(x) - y) ** 2).mean()
        return out * float("inf") if step == 3 else out

    scores = []
    with pytest.raises(Diverged, match=r"^fine-tuning diverged at step 3 of 10 \(lr 0\.01\): the loss is not finite$") as got:
        finetune(model, loss, lambda m: scores.append(m.training) or float(len(scores)), steps=10, lr=0.01)
    assert scores == [False] * 4  # before the first step and after steps 0, 1, 2: none after the broken one
    assert got.value.curve == [1.0, 2.0, 3.0, 4.0]  # the curve up to there travels with the error

    def overflows_after_two(m: nn.Module) -> dict[str, float]:  # weights finite, what they compute not
        seen.append(1)
        return {"loss": 0.5 if len(seen) <= 2 else float("nan")}

    with pytest.raises(Diverged, match="at step 1 of 5 .*its score is not finite") as got:
        finetune(model, lambda m, step: ((m(x) - y) ** 2).mean(), overflows_after_two, steps=5, lr=0.01)
    assert got.value.curve == [{"loss": 0.5}, {"loss": 0.5}]
    with pytest.raises(Diverged, match="at step 0 of 5 .*the weights are not finite"):  # a finite loss, weights broken by `keep`
        finetune(model, lambda m, step: ((m(x) - y) ** 2).mean(), lambda m: 0.0, steps=5, lr=0.01,
                 keep=lambda m: m.weight.fill_(float("nan")))
    curve = finetune(model, lambda m, step: ((m(x) - y) ** 2).mean(), lambda m: float(((m(x) - y) ** 2).mean()),
                     steps=5, lr=0.01, stop=lambda e: e < 0)
    assert len(curve) == 6 and curve[-1] < curve[0]


def test_falloffs_read_the_cosine_not_the_length_of_the_state():
    """α is the share of the state along the concept: a long state mostly off the concept is below a
    threshold of 0.5 even though its component (1.2) is above it."""
    z = torch.tensor([[1.2, 2.75, 0.0]])  # ‖z‖ ≈ 3.0, so α ≈ 0.4
    assert torch.equal(suppress(z, torch.tensor([1.0, 0.0, 0.0]), BoundedPower(a=0.5)), z)
    assert not torch.equal(suppress(z * torch.tensor([[1.0, 0.1, 1.0]]), torch.tensor([1.0, 0.0, 0.0]), BoundedPower(a=0.5)),
                           z * torch.tensor([[1.0, 0.1, 1.0]]))  # α ≈ 0.97: edited
    from anchoring.control.interventions import suppress_subspace

    basis = torch.eye(4)[:2]
    z = torch.tensor([[3.0, 0.0, 0.0, 10.0]])  # ‖Pz‖ = 3, ‖z‖ ≈ 10.4: α ≈ 0.29
    assert torch.equal(suppress_subspace(z, basis, BoundedPower(a=0.5)), z)
    near = torch.tensor([[3.0, 0.0, 0.0, 1.0]])  # α ≈ 0.95
    assert suppress_subspace(near, basis, BoundedPower(a=0.5))[0, 0] < 3.0


def test_repel_passes_states_exactly_orthogonal_to_the_concept_bit_identical():
    z = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    z[:, 0] = 0.0
    assert torch.equal(repel(z, torch.eye(8)[0]), z)


def test_the_falloff_mapper_never_turns_a_state_towards_the_concept():
    # a ceiling above 1 would remove more than the whole cosine: m(α) would go negative (attraction of −v̂)
    assert torch.equal(FalloffMapper(BoundedPower(b=2.0))(torch.tensor([1.0, 0.8])), torch.zeros(2))


def test_the_bezier_mapper_solves_for_the_curve_parameter():
    """With control points on the diagonal the curve is y = x, so m(α) = α exactly; and a curve above the
    diagonal is clamped to α, so repulsion never attracts."""
    identity = BezierMapper(1 / 3, 1 / 3, 2 / 3, 2 / 3, end=1.0)
    a = torch.tensor([0.1, 0.25, 0.5, 0.9])
    assert torch.allclose(identity(a), a, atol=1e-5)
    above = BezierMapper(0.1, 0.9, 0.2, 1.0, end=1.0)
    assert float(above(torch.tensor(0.5))) <= 0.5


def test_plans_take_dims_from_the_anchor_and_refuse_what_would_not_apply():
    from anchoring.anchor import Concept
    from anchoring.config import InterventionConfig
    from anchoring.kinds.colour.plan import make_plan

    anti = Concept("c", None, anchor=(-1.0, 0.0, 0.0, 0.0))  # a negative anchor still lives on dim 0
    assert make_plan(InterventionConfig(name="z", method="zero", concept="c"), [anti], 4).dims == (0,)
    with pytest.raises(AnchoringError, match=r"within 0\.\.3"):
        make_plan(InterventionConfig(name="z", method="zero", dims=[4]), [anti], 4)
    for method in ("suppress", "repel"):
        with pytest.raises(AnchoringError, match="dims apply to"):
            make_plan(InterventionConfig(name="r", method=method, concept="c", dims=[1]), [anti], 4)
    spread = Concept("s", None, dims=(1, 2))  # anchored in a subspace: no single direction
    assert make_plan(InterventionConfig(name="a", method="ablate", concept="s"), [spread], 4).dims == (1, 2)
    refused = {("suppress", "s", None): "suppress needs a concept with an anchor",
               ("zero", None, None): "zero needs dims",
               ("ablate", "x", None): r"unknown concept 'x' \(have: c, s\)",
               ("prune", None, (1, 1)): r"dims \[1, 1\] name a dim twice"}
    for (method, concept, dims), message in refused.items():
        with pytest.raises(AnchoringError, match=message):
            make_plan(InterventionConfig(name="r", method=method, concept=concept, dims=dims), [anti, spread], 4)


def test_relearning_curves_count_the_first_step_at_or_below_the_threshold():
    from anchoring.control.relearn import Curve
    from anchoring.kinds.colour.plan import concept_samples

    assert Curve(torch.tensor([0.5, 0.1, 0.05])).steps_to(0.1) == 1
    assert Curve(torch.tensor([0.5, 0.2])).steps_to(0.1) is None

    class Even:
        def probability(self, x):
            return torch.ones(len(x))

    pool = torch.arange(5.0)[:, None].expand(5, 3)
    drawn = concept_samples(Even(), pool, 5, seed=0)
    assert len({tuple(r) for r in drawn.tolist()}) == 5  # K distinct samples, not repeats


def test_a_difference_of_means_needs_both_classes():
    from anchoring.control.erasure import mean_difference

    acts = torch.randn(6, 3)
    for labels in (torch.ones(6), torch.zeros(6)):
        with pytest.raises(ValueError, match="both labelled and unlabelled"):
            mean_difference(acts, labels)


def test_selectivity_is_r_squared_and_equal_rows_share_the_front():
    import numpy as np

    sim = torch.linspace(0, 1, 50)
    errors = 0.3 * sim**2 + 0.1 * torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    r = np.corrcoef(errors[0].double().numpy(), (sim.double() ** 2).numpy())[0, 1]
    assert float(selectivity(errors, sim, 2.0)[0]) == pytest.approx(r**2, rel=1e-5) and 0.2 < r**2 < 0.9
    assert pareto_front(np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [2.0, 2.0]])) == [0, 1, 2]


def test_intervene_edits_the_first_item_of_a_module_that_returns_a_tuple():
    """nn.GRU returns (outputs, hidden): Capture read the first item, intervene failed on the tuple."""
    torch.manual_seed(0)
    gru = nn.Sequential()
    gru.add_module("rnn", nn.GRU(3, 4, batch_first=True))
    x = torch.randn(2, 5, 3)
    with intervene(gru, "rnn", lambda z: torch.zeros_like(z)):
        out, hidden = gru.rnn(x)
    assert torch.equal(out, torch.zeros(2, 5, 4)) and hidden.abs().sum() > 0  # the rest passes as it was


def test_intervene_on_a_site_that_never_runs_is_an_error_not_a_silent_no_op():
    """MultiheadAttention uses out_proj through its weights: a hook there never fires."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(1, 3, 4)
    with pytest.raises(AnchoringError, match="'out_proj' never ran in the 1 forward pass"):
        with intervene(attn, "out_proj", lambda z: torch.zeros_like(z)):
            attn(x, x, x)
    with intervene(attn, "out_proj", lambda z: torch.zeros_like(z)):
        pass  # no forward pass at all: nothing to say
    assert not attn.out_proj._forward_hooks and not attn._forward_hooks  # the hooks went either way


def test_a_capture_opened_inside_intervene_records_the_edited_output():
    from anchoring.anchor import Capture

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with intervene(model, "0", lambda z: torch.zeros_like(z)):
        with Capture(model, ["0"]) as cap:
            model(x)
            assert torch.equal(cap.acts["0"], torch.zeros(3, 4))
    with Capture(model, ["0"]) as cap, intervene(model, "0", lambda z: torch.zeros_like(z)):
        model(x)
        assert torch.equal(cap.acts["0"], nn.functional.linear(x, model[0].weight, model[0].bias))  # opened first: as computed


def test_suppress_and_repel_refuse_a_zero_or_per_row_direction():
    z = torch.randn(4, 4)
    for edit in (suppress, repel):
        with pytest.raises(AnchoringError, match="direction is zero"):
            edit(z, torch.zeros(4))
        with pytest.raises(AnchoringError, match="one vector of 4 entries, not of shape"):
            edit(z, torch.eye(4))  # (N, D) with N = the batch: each row along its own direction
