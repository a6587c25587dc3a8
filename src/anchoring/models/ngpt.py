"""A small normalised transformer (after nGPT): every hidden vector lives on the unit sphere.

Token embeddings, the residual stream and every weight row that reads from or writes to it
are unit vectors; a block moves the state part of the way towards its (normalised) output,
`h ← norm(h + α·(norm(block(h)) − h))`, with a learned per-dimension step α. Queries and
keys are normalised per head and scaled by a learned vector, so attention logits are scaled
cosines. There is no LayerNorm; `normalize_weights()` puts the matrices back on the sphere
after every optimiser step.

Hook points (plain `nn.Module` outputs, nothing method-specific):
`embed` and `blocks.{i}` — the residual stream `(B, T, D)` after the embedding / block i;
`blocks.{i}.attn.q_site` / `k_site` — unit queries / keys `(B, H, T, D/H)` before scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, dim=dim)


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of `(B, H, T, d)` (d even): rotate channel pairs by position."""
    T, d = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    ang = torch.arange(T, dtype=x.dtype, device=x.device)[:, None] * freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of even size")
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.s_qk = nn.Parameter(torch.ones(heads, 1, self.head_dim))
        self.q_site = nn.Identity()
        self.k_site = nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        split = lambda x: x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = self.q_site(_unit(rotary(split(self.q(h))))) * self.s_qk
        k = self.k_site(_unit(rotary(split(self.k(h))))) * self.s_qk
        # q, k are scaled unit vectors: the logit scale √d (not 1/√d) lets attention be sharp
        y = F.scaled_dot_product_attention(q, k, split(self.v(h)), is_causal=True, scale=math.sqrt(self.head_dim))
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """SwiGLU whose gate and value inputs are cosines, rescaled by learned vectors."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.s_u = nn.Parameter(torch.ones(hidden))
        self.s_v = nn.Parameter(torch.ones(hidden))
        self.width = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, v = self.up(h).chunk(2, dim=-1)
        return self.down(u * self.s_u * F.silu(v * self.s_v * math.sqrt(self.width)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, alpha: float) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.mlp = MLP(width, mlp_ratio * width)
        self.alpha_attn = nn.Parameter(torch.full((width,), alpha))
        self.alpha_mlp = nn.Parameter(torch.full((width,), alpha))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = _unit(h + self.alpha_attn * (_unit(self.attn(h)) - h))
        return _unit(h + self.alpha_mlp * (_unit(self.mlp(h)) - h))


class NormalizedTransformer(nn.Module):
    """Causal LM over `vocab` tokens; `forward(tokens (B, T)) → logits (B, T, vocab)`."""

    def __init__(self, vocab: int, width: int = 64, layers: int = 4, heads: int = 8, context: int = 64,
                 mlp_ratio: int = 4, alpha: float = 0.2, logit_scale: float = 10.0) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, alpha) for _ in range(layers))
        self.unembed = nn.Linear(width, vocab, bias=False)
        self.s_z = nn.Parameter(torch.full((vocab,), logit_scale))
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1.0 / math.sqrt(width))
        self.normalize_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.context:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens is longer than the context {self.context}")
        h = _unit(self.embed(tokens))
        for block in self.blocks:
            h = block(h)
        return self.unembed(h) * self.s_z

    @torch.no_grad()
    def normalize_weights(self) -> None:
        """Put every matrix back on the sphere along the residual (embedding) dimension."""
        self.embed.weight.copy_(_unit(self.embed.weight, 1))
        self.unembed.weight.copy_(_unit(self.unembed.weight, 1))
        for b in self.blocks:
            for lin in (b.attn.q, b.attn.k, b.attn.v, b.mlp.up):  # read the residual: rows
                lin.weight.copy_(_unit(lin.weight, 1))
            for lin in (b.attn.o, b.mlp.down):  # write the residual: columns
                lin.weight.copy_(_unit(lin.weight, 0))
