import pytest
import torch
from torch import nn

from anchoring.anchor import Capture
from anchoring.errors import AnchoringError
from anchoring.train import Ensemble


class Tiny(nn.Module):
    """A model the method knows nothing about: capture must work by module path alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(3, 5)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(5, 2))
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_capture_reads_named_sites_and_cleans_up():
    torch.manual_seed(0)
    m = Tiny()
    x = torch.randn(4, 3)
    with Capture(m, ["stem", "body.1"]) as cap:
        m(x)
        assert torch.allclose(cap.acts["stem"], m.stem(x))
        assert torch.allclose(cap.acts["body.1"], m.body(m.stem(x)))
    assert not m.stem._forward_hooks and not m.body[1]._forward_hooks
    assert cap.acts == {}


def test_unknown_site_names_it():
    with pytest.raises(AnchoringError, match="no module 'neck'.*stem"):
        Capture(Tiny(), ["neck"])


def test_one_site_by_name_and_terms_name_what_they_miss():
    from anchoring.anchor import Concept, build_term
    from anchoring.control import suppress

    m = Tiny()
    with Capture(m, "body.1") as cap:  # a string is one site, not the sites 'b', 'o', 'd', …
        m(torch.randn(4, 3))
        assert set(cap.acts) == {"body.1"}
    term = build_term("anchor", "w", latent_dim=2, site="body.1", concept=Concept("c", None), direction=[1.0, 0.0])
    z = torch.randn(4, 2)
    with pytest.raises(AnchoringError, match="reads site 'body.1'; the activations given hold 'stem'"):
        term({"stem": z}, {"c": torch.ones(4)})
    with pytest.raises(AnchoringError, match="needs labels for concept 'c'; the labels given are for 'd'"):
        term({"body.1": z}, {"d": torch.ones(4)})
    assert float(term({"body.1": z}, {"c": torch.ones(4)})) > 0
    with pytest.raises(AnchoringError, match="the direction has 3 entries, the activations it edits 2"):
        suppress(z, torch.ones(3))


def test_ensemble_members_match_eager_models():
    ens = Ensemble(Tiny, seeds=[5, 6, 7])
    eager = []
    for s in (5, 6, 7):
        torch.manual_seed(s)
        eager.append(Tiny())
    x = torch.randn(3, 4, 3)
    with Capture(ens.template, ["body.1"]) as cap:
        out, acts = ens.run(lambda o, a, _x: (o, a["body.1"]), cap, x)
    for i, m in enumerate(eager):
        assert torch.allclose(out[i], m(x[i]), atol=1e-6)
        assert torch.allclose(acts[i], m.body(m.stem(x[i])), atol=1e-6)
    for i, m in enumerate(ens.members()):
        assert torch.allclose(m(x[i]), eager[i](x[i]), atol=1e-6)


def test_terms_can_read_before_or_after_normalisation():
    from anchoring import experiments
    from anchoring.kinds.colour.objective import build_objective
    from anchoring.models import ColourAutoencoder

    cfg = experiments.load("anchored", ["terms.0.kind=unitarity", "terms.0.site=encoder"])
    cfg.terms[0].power = cfg.terms[0].shift = None  # options that only apply to separation
    objective = build_objective(cfg)
    assert objective.sites == ["encoder", "latent"]
    torch.manual_seed(0)
    model = ColourAutoencoder()
    x = torch.rand(16, 3)
    with Capture(model, objective.sites) as cap:
        model(x)
        unit = objective.terms[0](cap.acts, {})
        post = cap.acts["latent"]
    assert torch.allclose(post.norm(dim=-1), torch.ones(16))  # the other site saw the normalised latent
    pre = model.encoder(x)
    assert torch.allclose(unit, (pre.norm(dim=-1) - 1).pow(2).mean())
    assert unit > 0.01  # the pre-norm activation is not unit length


def test_a_module_returning_a_tuple_is_captured_at_its_first_output():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x * 3  # (output, auxiliary), as attention modules often return

    model = nn.Sequential(Pair())
    with Capture(model, ["0"]) as cap:
        model(torch.ones(2, 3))
        assert torch.equal(cap.acts["0"], torch.full((2, 3), 2.0))


def test_an_orthonormal_basis_has_unit_rows():
    from anchoring.anchor.basis import orthonormal

    e1, e2 = torch.eye(3)[1], torch.eye(3)[2]
    basis = orthonormal([e1, e1 + 2 * e2])
    assert len(basis) == 2 and all(float(b.norm()) == pytest.approx(1.0) for b in basis)
    assert float(basis[0] @ basis[1]) == pytest.approx(0.0, abs=1e-7)
    # a direction given twice, or one in the span of the others, adds none: rounding leaves a remainder
    # of about 1e-8 off the axes, and an edit along it would act in a direction nobody chose
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    assert len(orthonormal([a, a])) == 1 and len(orthonormal([a, b, a + b])) == 2 and len(orthonormal([a, 3 * a - 0.0])) == 1


def test_a_term_names_a_latent_of_the_wrong_width_and_takes_boolean_labels():
    from anchoring.anchor import Concept, build_term

    c = Concept("c", None, anchor=(1.0, 0.0, 0.0), dims=(0,))
    anti = build_term("anti-subspace", "w", latent_dim=3, concept=c, select="unlabelled")
    pull = build_term("anchor", "w", latent_dim=3, concept=c)
    z = torch.randn(5, 3)
    labels = torch.tensor([True, False, False, True, False])
    got = anti({"latent": z}, {"c": labels})  # bool labels: 1 − w once failed inside torch
    assert torch.allclose(got, anti({"latent": z}, {"c": labels.float()}))
    for term in (anti, pull):
        with pytest.raises(AnchoringError, match="built for a latent of 3 dims; 'latent' gives 4"):
            term({"latent": torch.randn(5, 4)}, {"c": labels})


def test_a_term_refuses_labels_outside_zero_to_one_and_still_runs_under_vmap():
    from torch.func import vmap

    from anchoring.anchor import Concept, build_term

    c = Concept("c", None, anchor=(1.0, 0.0, 0.0), dims=(0,))
    anti = build_term("anti-subspace", "w", latent_dim=3, concept=c, select="unlabelled")
    z = torch.randn(5, 3)
    for bad, said in ((torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0]), "from 0 to 2"),
                      (torch.tensor([0.0, -1.0, 0.0, 1.0, 0.0]), "from -1 to 1"),
                      (torch.tensor([0.0, float("nan"), 0.0, 1.0, 0.0]), "and NaN")):
        with pytest.raises(AnchoringError, match=f"must lie in \\[0, 1\\].*{said}"):
            anti({"latent": z}, {"c": bad})
    soft = torch.tensor([0.0, 0.25, 1.0, 0.5, 0.0])  # soft labels in range are weights, as before
    assert torch.isfinite(anti({"latent": z}, {"c": soft}))
    per_model = vmap(lambda zz, w: anti({"latent": zz}, {"c": w}))(z.expand(2, 5, 3), soft.expand(2, 5))
    assert torch.allclose(per_model, anti({"latent": z}, {"c": soft}).expand(2))
