"""The normalised transformer computes the function its docs define, checked against a slow,
loop-by-loop restatement of it: unit embeddings, rotary positions at the standard frequencies,
unit queries and keys scaled by s_qk² under a logit scale of √d, causal softmax, SwiGLU on
rescaled cosines, and every residual step h ← unit(h + α(unit(x) − h))."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anchoring.models.ngpt import NormalizedTransformer, apply_rotary, rotary_tables


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """(T, d): channel pair i at position t turned by t · base^(−2i/d)."""
    T, d = x.shape
    out = torch.empty_like(x)
    for t in range(T):
        for i in range(d // 2):
            a = t * base ** (-2 * i / d)
            x1, x2 = x[t, 2 * i], x[t, 2 * i + 1]
            out[t, 2 * i], out[t, 2 * i + 1] = x1 * math.cos(a) - x2 * math.sin(a), x1 * math.sin(a) + x2 * math.cos(a)
    return out


def reference_logits(m: NormalizedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """One sequence `(T,)` → logits `(T, vocab)`, written out without the model's shortcuts."""
    h = unit(m.embed.weight[tokens])
    T = len(tokens)
    for b in m.blocks:
        a = b.attn
        H, d = a.heads, a.head_dim
        heads = []
        for j in range(H):
            cols = slice(j * d, (j + 1) * d)
            q = unit(rotate(h @ a.q.weight[cols].T)) * a.s_qk[j, 0] ** 2
            k = unit(rotate(h @ a.k.weight[cols].T))
            v = h @ a.v.weight[cols].T
            scores = math.sqrt(d) * q @ k.T
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v)
        x = torch.cat(heads, -1) @ a.o.weight.T
        h = unit(h + b.alpha_attn * (unit(x) - h))
        mlp, n = b.mlp, b.mlp.s_u.shape[0]
        u = (h @ mlp.up.weight[:n].T) * mlp.s_u
        gate = (h @ mlp.up.weight[n:].T) * mlp.s_v * math.sqrt(mlp.width)
        x = (u * F.silu(gate)) @ mlp.down.weight.T
        h = unit(h + b.alpha_mlp * (unit(x) - h))
    return h @ (m.unembed.weight * m.s_z[:, None]).T


@pytest.fixture()
def model() -> NormalizedTransformer:
    torch.manual_seed(0)
    m = NormalizedTransformer(vocab=11, width=16, layers=2, heads=2, context=12, mlp_hidden=24).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # learned scales away from their initial values, so a dropped or squared one shows
        for name, p in m.named_parameters():
            if p.dim() == 1 or name.endswith("s_qk"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
    return m


def test_the_model_computes_the_function_it_defines(model):
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    with torch.no_grad():
        got = model(tokens[None])[0]
        want = reference_logits(model, tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the cached rotary tables are float32


def test_embeddings_enter_the_stream_as_unit_vectors_even_when_their_rows_are_not(model):
    """A weight edit (delete) leaves embedding rows shorter than 1; the stream starts on the sphere anyway."""
    with torch.no_grad():
        model.embed.weight.mul_(torch.linspace(0.3, 3.0, model.embed.weight.shape[0], dtype=torch.float64)[:, None])
        tokens = torch.tensor([0, 10, 5, 7])
        got, want = model(tokens[None])[0], reference_logits(model, tokens)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the cached rotary tables are float32


def test_the_real_form_of_rotary_used_under_compile_is_the_same_turn():
    x = torch.randn(7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cos, sin = rotary_tables(7, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin), rotate(x), rtol=1e-12, atol=1e-12)


def test_the_model_refuses_shapes_it_cannot_compute():
    with pytest.raises(ValueError, match="width 12 must split into 4 heads of even size"):  # heads of 3
        NormalizedTransformer(vocab=5, width=12, layers=1, heads=4)
    with pytest.raises(ValueError, match=r"no block 2 \(the model has 2\)"):
        NormalizedTransformer(vocab=5, width=8, layers=2, heads=2, extra_units={2: 4})
    model = NormalizedTransformer(vocab=5, width=8, layers=2, heads=2, context=6)
    with pytest.raises(ValueError, match="sequence of 7 tokens is longer than the context 6"):
        model(torch.zeros(1, 7, dtype=torch.long))
