"""Weight surgery (`control.surgery`): which layouts it accepts, and that its edits do what they say."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchoring.control import ablate, ablate_direction, find_layout, prune
from anchoring.control.surgery import blind_readers, project_out, residual_component
from anchoring.errors import AnchoringError
from anchoring.models import ColourAutoencoder


def site_output(model: nn.Module, site: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(site).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


class Branches(nn.Module):
    """enc writes the latent; gate, of the same width, runs after enc on another branch."""

    def __init__(self, join: str):
        super().__init__()
        self.enc, self.gate, self.latent, self.dec = nn.Linear(3, 4), nn.Linear(3, 4), nn.Identity(), nn.Linear(4, 3)
        self.join = join

    def forward(self, x):
        z = self.enc(x)
        g = self.gate(x)
        if self.join == "scale output":
            return self.dec(self.latent(z)) * torch.sigmoid(g).mean(-1, keepdim=True)
        if self.join == "add before site":
            return self.dec(self.latent(z + g))
        z += g  # in place: z is still enc's output tensor, but no longer enc's values
        return self.dec(self.latent(z))


def test_the_producer_is_the_linear_whose_output_reaches_the_site():
    torch.manual_seed(0)
    m = Branches("scale output")
    assert find_layout(m, "latent") == find_layout(m, "latent", torch.zeros(2, 3))
    assert find_layout(m, "latent").producer == "enc"  # not gate, which ran last
    z = site_output(ablate(m, [0]), "latent", torch.rand(8, 3))
    assert torch.equal(z[:, 0], torch.zeros(8)) and z[:, 1:].abs().min() > 0
    for join, why in [("add before site", "no nn.Linear writes it"), ("add in place", "another branch")]:
        with pytest.raises(AnchoringError, match=why):
            find_layout(Branches(join), "latent")


class Between(nn.Module):
    def __init__(self, mid: nn.Module, bias: bool = True):
        super().__init__()
        self.enc, self.mid, self.latent, self.dec = nn.Linear(3, 4, bias=bias), mid, nn.Identity(), nn.Linear(4, 3)

    def forward(self, x):
        return self.dec(self.latent(self.mid(self.enc(x))))


class FunctionalSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return torch.sigmoid(self.lin(x))  # no hook sees this


class Encoded(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.dec = encoder, nn.Linear(4, 3)

    def forward(self, x):
        return self.dec(self.encoder(x))


def relu_with_positive_bias() -> nn.Module:
    m = Between(nn.ReLU())
    with torch.no_grad():
        m.enc.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    return m


class Rescaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return 2 * F.normalize(self.lin(x), dim=-1)  # functional, but a positive rescaling


@pytest.mark.parametrize("model, site, what", [
    (lambda: Between(nn.Sigmoid(), bias=False), "latent", "Sigmoid.*sits between"),  # f(0) = 1/2 shows on zeros only with a bias
    (relu_with_positive_bias, "latent", "ReLU.*sits between"),  # f(bias) = bias on a zero probe
    (lambda: Encoded(FunctionalSigmoid()), "encoder", "functional op"),
    (lambda: Between(nn.Sigmoid(), bias=False), "mid", r"site's own module \(Sigmoid\) computes its output"),
])
def test_element_wise_nonlinearities_are_refused(model, site, what):
    torch.manual_seed(0)
    with pytest.raises(AnchoringError, match=what):
        ablate(model(), [0], site=site)


def test_per_vector_rescalings_are_accepted_and_train_mode_is_kept():
    torch.manual_seed(0)
    ae = ColourAutoencoder(latent_dim=5, hidden=(8,)).train()
    assert (find_layout(ae, "latent").producer, find_layout(ae, "latent").consumer) == ("encoder.2", "decoder.0")
    assert ae.training and all(m.training for m in ae.modules())
    chained = Between(nn.Sequential(nn.Identity(), nn.Dropout(0.5), ae.latent)).train()  # dropout is off for the probe
    assert (find_layout(chained, "latent").producer, chained.training) == ("enc", True)
    fn = Encoded(Rescaled())
    assert find_layout(fn, "encoder").producer == "encoder.lin"
    assert torch.equal(ablate(fn, [1], site="encoder").encoder(torch.rand(6, 3))[:, 1], torch.zeros(6))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
def test_surgery_follows_the_models_dtype_and_device(device):
    torch.manual_seed(0)
    m = ColourAutoencoder(latent_dim=6, hidden=(16,)).double().to(device)
    x = torch.rand(40, 3, dtype=torch.float64, device=device)
    a, p = ablate(m, [1, 3]), prune(m, [1, 3])
    assert p.encoder[-1].weight.dtype == p.decoder[0].weight.dtype == torch.float64
    assert p.encoder[-1].weight.device.type == p.decoder[0].weight.device.type == device
    assert p.encoder[-1].weight.requires_grad and p.decoder[0].bias.requires_grad
    assert (a(x) - p(x)).abs().max() < 1e-12
    v = torch.randn(6)  # float32 on the CPU: follows the model, not the other way round
    z = ablate_direction(m, v).encoder(x)
    assert z.dtype == torch.float64 and (z @ F.normalize(v.double(), dim=0).to(device)).abs().max() < 1e-12


def test_surgery_leaves_the_global_rng_alone():
    m = ColourAutoencoder(latent_dim=6, hidden=(16,)).train()
    m.latent = nn.Sequential(nn.Dropout(0.1), m.latent)  # a train-mode dropout would draw in the probe
    torch.manual_seed(1)
    expected = torch.rand(3)
    for edit in (lambda: prune(m, [0]), lambda: ablate(m, [0]), lambda: find_layout(m, "latent")):
        torch.manual_seed(1)
        edit()
        assert torch.equal(torch.rand(3), expected)


class Stream(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.write, self.read = nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, tokens):
        return self.read(self.write(self.embed(tokens)))


def test_a_zero_direction_is_refused_not_ignored():
    m = ColourAutoencoder()
    zero = torch.zeros(4)
    with pytest.raises(AnchoringError, match="no direction to remove"):
        ablate_direction(m, zero)
    s = Stream()
    with pytest.raises(AnchoringError, match="no direction to remove"):
        project_out(s, zero, ["embed"], ["write"])
    with pytest.raises(AnchoringError, match="no direction to remove"):
        blind_readers(s, zero, ["read"])
    with pytest.raises(AnchoringError, match="no direction to remove"):
        residual_component(s, zero, torch.arange(5), ["embed"])
    v = torch.tensor([0.0, 3.0, 0.0, 4.0])  # a non-zero one still works, and in float64 too
    edited = project_out(s.double(), v, ["embed"], ["write"])
    v_hat = v.double() / 5
    emb, w, b = edited.embed.weight.detach(), edited.write.weight.detach(), edited.write.bias.detach()
    assert emb.dtype == torch.float64 and (emb @ v_hat).abs().max() < 1e-15
    assert (v_hat @ w).abs().max() < 1e-15 and abs(float(b @ v_hat)) < 1e-15


def test_a_model_that_reads_tokens_is_edited_with_a_probe_batch():
    # the default probe is floats of the first Linear's width; a token model needs a batch of its own input
    s = Stream()
    tokens = torch.tensor([[0, 1, 2, 3, 4]])
    with pytest.raises(AnchoringError, match="pass probe=") as e:
        ablate(s, [1], site="write")
    assert "\n" not in str(e.value)
    z = site_output(ablate(s, [1], site="write", probe=tokens), "write", tokens)
    assert torch.equal(z[..., 1], torch.zeros(1, 5)) and not torch.equal(z, torch.zeros_like(z))
    v = torch.tensor([1.0, 1.0, 0.0, 0.0])
    z = site_output(ablate_direction(s, v, site="write", probe=tokens), "write", tokens)
    assert torch.allclose(z @ F.normalize(v, dim=0), torch.zeros(1, 5), atol=1e-6)
    assert prune(s, [0, 2], site="write", probe=tokens).read.in_features == 2


class Written(nn.Module):
    """An embedding and a biased Linear both writing a 4-wide stream."""

    def __init__(self):
        super().__init__()
        self.emb, self.write = nn.Embedding(5, 4), nn.Linear(4, 4, bias=True)

    def forward(self, tokens):
        return self.write(self.emb(tokens))


def test_project_out_removes_the_direction_from_a_writers_bias_too():
    torch.manual_seed(0)
    m = Written()
    with torch.no_grad():
        m.write.bias.copy_(torch.tensor([0.5, 1.0, -0.3, 0.2]))
    v = F.normalize(torch.tensor([1.0, 1.0, 0.0, 0.0]), dim=0)
    out = project_out(m, v, ["emb"], ["write"])(torch.arange(5))
    assert out.abs().max() > 0.1 and (out @ v).abs().max() < 1e-6


def test_the_residual_component_counts_a_state_pointing_away_from_the_direction():
    m = Written()
    with torch.no_grad():
        m.emb.weight.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]).expand(5, 4))
    assert residual_component(m, torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.arange(5)[None], ["emb"]) == pytest.approx(1.0)


class Unused(nn.Module):
    """A Linear autoencoder with a module the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.latent, self.dec, self.spare = nn.Linear(3, 4), nn.Identity(), nn.Linear(4, 3), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.latent(self.enc(x)))


def test_weight_edits_name_what_they_cannot_find_in_a_users_model():
    for model, site, message in ((Unused(), "spare", "site 'spare' did not run in a forward pass"),
                                 (nn.Sequential(nn.Tanh()), "0", "the model has no nn.Linear")):
        with pytest.raises(AnchoringError, match=message):
            find_layout(model, site)
    m, v = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)), torch.tensor([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(AnchoringError, match=r"'2' is not a Linear writing a 4-wide residual stream"):
        project_out(m, v, embeddings=["0"], writers=["1", "2"])
    with pytest.raises(AnchoringError, match=r"blinding strength must be in \[0, 1\], not 1.5"):
        blind_readers(m, v, ["1"], strength=1.5)
    with pytest.raises(AnchoringError, match="nothing to blind: no reader given"):
        blind_readers(m, v, [])


def test_ablation_cuts_both_sides_of_the_dims_so_fine_tuning_cannot_regrow_them():
    """With only the producer's rows zeroed the edited model computes the same function, but the
    readers' columns still carry gradient back, and a relearning attack regrows the rows (to |w| ≈ 0.17
    in 20 Adam steps). Zeroed on both sides, a gradient step leaves them exactly 0."""
    torch.manual_seed(0)
    model = ColourAutoencoder(latent_dim=6)
    layout = find_layout(model, "latent")
    cut = ablate(model, [1, 3])
    prod, cons = cut.get_submodule(layout.producer), cut.get_submodule(layout.consumer)
    assert torch.all(prod.weight[[1, 3]] == 0) and torch.all(prod.bias[[1, 3]] == 0)
    assert torch.all(cons.weight[:, [1, 3]] == 0) and cons.weight[:, [0, 2, 4, 5]].abs().sum() > 0
    x = torch.rand(64, 3)
    opt = torch.optim.Adam(cut.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        (cut(x) - x).pow(2).mean().backward()
        opt.step()
    assert torch.all(prod.weight[[1, 3]] == 0) and torch.all(cons.weight[:, [1, 3]] == 0)
