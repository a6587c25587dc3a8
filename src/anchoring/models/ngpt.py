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
from torch.autograd.function import once_differentiable


class _Unit(torch.autograd.Function):
    """x / max(‖x‖, 1e-12) over the last dim, with a hand-written backward.

    The model normalises about five times per block, so this is the most frequent op of a step.
    `F.normalize` records norm, clamp, expand and divide for autograd and differentiates each;
    the closed form of the projection, dx = (g − y⟨g, y⟩)/‖x‖, takes half the time (forward and
    backward of a (12, 64, 128) batch: about 410 → 220 µs on one CPU thread). The result is
    `F.normalize`'s to float rounding.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        return x * inv, inv

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, inv = output
        ctx.mark_non_differentiable(inv)
        ctx.save_for_backward(y, inv)

    @staticmethod
    @once_differentiable  # first order only: a second derivative through it raises instead of being wrong
    def backward(ctx, g: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        y, inv = ctx.saved_tensors
        return g.addcmul(y, (g * y).sum(-1, keepdim=True), value=-1).mul_(inv)


def training_bytes(vocab: int, width: int, layers: int, hidden: int, positions: int, side_by_side: int,
                   held: int) -> int:
    """Bytes that training this model takes, without building one: weights, gradients and two Adam
    moments per parameter; one step's saved activations (about 10 states of the width and 4 of the MLP
    per position and block, 3 of the vocabulary for the logits) over `positions` tokens per step;
    doubled for temporaries; times the models training `side_by_side`; plus `held` finished models
    kept in memory. A rough upper bound, meant to refuse what cannot fit rather than predict the peak."""
    params = 2 * vocab * width + layers * (4 * width ** 2 + 3 * width * hidden + 2 * hidden + 2 * width)
    activations = positions * (layers * (10 * width + 4 * hidden) + 3 * vocab)
    return 2 * 4 * side_by_side * (4 * params + activations) + 4 * params * held


def _unit(x: torch.Tensor) -> torch.Tensor:
    """`x` scaled to unit length along its last dim (the sphere every state lives on)."""
    return _Unit.apply(x)[0]


def rotary_tables(T: int, d: int, base: float = 10000.0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `(T, d/2)` of the rotary angles: position × frequency of each channel pair."""
    freq = base ** (-torch.arange(0, d, 2, dtype=dtype, device=device) / d)
    ang = torch.arange(T, dtype=dtype, device=device)[:, None] * freq[None, :]
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (0,1), (2,3), … of `(…, T, d)` by the tabulated angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal attention on unit queries and keys, with rotary positions.

    The rotary cos/sin tables are buffers computed once for the model's context (and again only
    if a longer sequence or another dtype/device shows up), not on every forward: at LM size the
    trigonometry and `arange` of every call were a visible share of a CPU step. They are not
    persistent, so checkpoints are unchanged.
    """

    def __init__(self, width: int, heads: int, context: int = 64) -> None:
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
        cos, sin = rotary_tables(context, self.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _tables(self, T: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.rope_cos.shape[0] or self.rope_cos.dtype != like.dtype or self.rope_cos.device != like.device:
            cos, sin = rotary_tables(max(T, self.rope_cos.shape[0]), self.head_dim, dtype=like.dtype, device=like.device)
            self.rope_cos, self.rope_sin = cos, sin
        return self.rope_cos[:T], self.rope_sin[:T]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        H, d = self.heads, self.head_dim
        # q and k in one matmul, rotated (as complex pairs, one kernel) and normalised together; v in
        # its own matmul, so the backward does not concatenate the gradients of qk and v
        qk = F.linear(h, torch.cat([self.q.weight, self.k.weight])).reshape(B, T, 2 * H, d)
        v = F.linear(h, self.v.weight).reshape(B, T, H, d).transpose(1, 2)
        cos, sin = self._tables(T, qk)
        if torch.compiler.is_compiling():  # inductor fuses the real form (it cannot generate complex kernels)
            qk = apply_rotary(qk, cos[:, None], sin[:, None])
        else:
            turn = torch.complex(cos, sin)[:, None]  # (T, 1, d/2)
            qk = torch.view_as_real(torch.view_as_complex(qk.reshape(B, T, 2 * H, d // 2, 2)) * turn).flatten(-2)
        q, k = _unit(qk).transpose(1, 2).split(H, dim=1)
        # (s·q)·(s·k) = (s²·q)·k: one scaled copy instead of two
        q = self.q_site(q) * self.s_qk.square()
        k = self.k_site(k)
        # q, k are scaled unit vectors: the logit scale √d (not 1/√d) lets attention be sharp
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=math.sqrt(self.head_dim))
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """SwiGLU whose gate and value inputs are cosines, rescaled by learned vectors.

    `extra` hidden units (default none) come after the `hidden` original ones: `up` holds the u rows
    of all `hidden + extra` units, then their v rows; `down` one column per unit. `route`, when set to
    a `(B, T)` bool tensor (True: a labelled position) before a forward, routes gradients by unit (see
    `routed_down`); it is a plain attribute, not a buffer, so checkpoints do not hold it. With
    `extra = 0` the module is exactly the plain SwiGLU."""

    def __init__(self, width: int, hidden: int, extra: int = 0) -> None:
        super().__init__()
        n = hidden + extra
        self.up = nn.Linear(width, 2 * n, bias=False)
        self.down = nn.Linear(n, width, bias=False)
        self.s_u = nn.Parameter(torch.ones(n))
        self.s_v = nn.Parameter(torch.ones(n))
        self.width, self.hidden, self.extra = width, hidden, extra
        self.route: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # The learned scales multiply the (units × width) weight rows, not the (batch × time × units)
        # activations: the same function for a fraction of the element-wise work, and u and v come
        # from two matmuls on row slices, so the backward needs no concatenation of their gradients
        # (the MLP's forward and backward about 13% faster at the nanoGPT CPU size). `up` is read
        # through its weight, so a hook on `mlp.up` would not fire; the hook points are the blocks'.
        n, w = self.s_u.shape[0], self.up.weight
        u = F.linear(h, w[:n] * self.s_u[:, None])
        v = F.linear(h, w[n:] * (self.s_v * math.sqrt(self.width))[:, None])
        a = u * F.silu(v)
        if self.extra and self.route is not None:
            return routed_down(a, self.down.weight, self.route, self.hidden)
        return self.down(a)


def routed_down(a: torch.Tensor, weight: torch.Tensor, route: torch.Tensor, hidden: int) -> torch.Tensor:
    """`a @ weightᵀ` with gradients routed by unit: at labelled positions (`route` True) only the
    units from `hidden` on (the extra ones) pass gradients, at the other positions only the first
    `hidden`. A blocked (position, unit) pair sends no gradient to anything: not to its activation
    (so not to its `up` rows, scales or earlier layers) and not to its `down` column, which is why
    the blocked part goes through a detached copy of the weight. The forward value is `a @ weightᵀ`
    (summed in two parts)."""
    extra = (torch.arange(a.shape[-1], device=a.device) >= hidden)
    live = (route.to(torch.bool).unsqueeze(-1) == extra).to(a.dtype)  # (B, T, units)
    return F.linear(a * live, weight) + F.linear((a * (1.0 - live)).detach(), weight.detach())


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, alpha: float, context: int = 64, extra: int = 0,
                 hidden: int | None = None) -> None:
        super().__init__()
        self.attn = Attention(width, heads, context)
        self.mlp = MLP(width, hidden or mlp_ratio * width, extra)
        self.alpha_attn = nn.Parameter(torch.full((width,), alpha))
        self.alpha_mlp = nn.Parameter(torch.full((width,), alpha))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h + α·(x − h) as one lerp kernel
        h = _unit(torch.lerp(h, _unit(self.attn(h)), self.alpha_attn))
        return _unit(torch.lerp(h, _unit(self.mlp(h)), self.alpha_mlp))


class NormalizedTransformer(nn.Module):
    """Causal LM over `vocab` tokens; `forward(tokens (B, T)) → logits (B, T, vocab)`.

    `mlp_hidden` sets the MLP's hidden units directly (default `mlp_ratio × width`): SwiGLU has three
    matrices where a GELU MLP has two, so 8/3 × width hidden units match a GELU MLP 4× in size.
    `extra_units` `{block: n}` gives those blocks' MLPs n extra hidden units (gradient routing). The
    model is first built and initialised exactly as without them (same draws from the global RNG, so
    every other weight equals the plain model's under the same seed); the extra units' `up` rows and
    `down` columns are then drawn from their own generator seeded with `extra_seed`, their scales 1."""

    unit_residual = True  # every residual state is a unit vector, and its length sets the logits' scale

    def __init__(self, vocab: int, width: int = 64, layers: int = 4, heads: int = 8, context: int = 64,
                 mlp_ratio: int = 4, alpha: float = 0.2, logit_scale: float = 10.0,
                 extra_units: dict[int, int] | None = None, extra_seed: int = 0, mlp_hidden: int | None = None) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, alpha, context, hidden=mlp_hidden) for _ in range(layers))
        self.unembed = nn.Linear(width, vocab, bias=False)
        self.s_z = nn.Parameter(torch.full((vocab,), logit_scale))
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1.0 / math.sqrt(width))
        if extra_units:
            self._add_units(extra_units, extra_seed)
        self.normalize_weights()

    @torch.no_grad()
    def _add_units(self, extra_units: dict[int, int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for i, n in sorted(extra_units.items()):
            if not 0 <= i < len(self.blocks):
                raise ValueError(f"no block {i} (the model has {len(self.blocks)})")
            old = self.blocks[i].mlp
            if n <= 0:
                continue
            with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not advance the global RNG
                new = MLP(old.width, old.hidden, n)
            H, W = old.hidden, old.width
            std = 1.0 / math.sqrt(W)
            new.up.weight[:H] = old.up.weight[:H]
            new.up.weight[H + n:2 * H + n] = old.up.weight[H:]
            new.up.weight[H:H + n] = torch.randn(n, W, generator=g) * std
            new.up.weight[2 * H + n:] = torch.randn(n, W, generator=g) * std
            new.down.weight[:, :H] = old.down.weight
            new.down.weight[:, H:] = torch.randn(W, n, generator=g) * std
            new.s_u[:H], new.s_v[:H] = old.s_u, old.s_v
            self.blocks[i].mlp = new  # same position among the block's modules: the same parameter order

    def residual_writers(self) -> tuple[list[str], list[str]]:
        """(embedding tables, Linear layers) whose outputs enter the residual stream, by module path."""
        writers = [f"blocks.{i}.{part}" for i in range(len(self.blocks)) for part in ("attn.o", "mlp.down")]
        return ["embed"], writers

    def residual_readers(self) -> dict[str, list[str]]:
        """The Linear layers that read the residual stream, by the residual site they follow: block i's
        q, k and v read the state at site `blocks.{i-1}` (`embed` for block 0), and its MLP input the
        state after the block's own attention step, so all four lie between that site and
        `blocks.{i}`; the unembedding reads the state after the last block. Readers downstream of a
        site S are the lists of S and of every later site."""
        sites = ["embed", *[f"blocks.{i}" for i in range(len(self.blocks))]]
        out = {s: [f"blocks.{i}.{p}" for p in ("attn.q", "attn.k", "attn.v", "mlp.up")] for i, s in enumerate(sites[:-1])}
        out[sites[-1]] = ["unembed"]
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.context:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens is longer than the context {self.context}")
        h = _unit(self.embed(tokens))
        for block in self.blocks:
            h = block(h)
        return F.linear(h, self.unembed.weight * self.s_z[:, None])  # scale the (vocab, D) weight, not every logit

    @torch.no_grad()
    def normalize_weights(self) -> None:
        """Put every matrix back on the sphere along the residual (embedding) dimension.

        Called after every optimiser step, so it is done in place: one norm per matrix and one
        fused clamp and one fused divide per group (`torch._foreach_*`), no normalised copies.
        The result is what `F.normalize` gives (x / max(‖x‖, 1e-12))."""
        rows = [self.embed.weight, self.unembed.weight,
                *[lin.weight for b in self.blocks for lin in (b.attn.q, b.attn.k, b.attn.v, b.mlp.up)]]  # read the residual
        cols = [lin.weight for b in self.blocks for lin in (b.attn.o, b.mlp.down)]  # write the residual
        for group, dim in ((rows, 1), (cols, 0)):
            norms = [torch.linalg.vector_norm(w, dim=dim, keepdim=True) for w in group]
            torch._foreach_clamp_min_(norms, 1e-12)
            torch._foreach_div_(group, norms)
