"""The regularizers of method.md §2, as functions of activations.

Each takes activations `(..., N, D)` (N samples of a batch; leading dims free, so the same
code serves an ensemble or a sequence) and returns a per-sample loss `(..., N)`. Selection
and weighting by labels happen elsewhere (`anchor.terms`), so each function stays a formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v, dim=-1)


class _Power(torch.autograd.Function):
    """x^p whose backward reuses the forward's result: d/dx x^p = p·x^p / x.

    Autograd's own pow backward evaluates a second pow (x^(p−1)); at p = 100 over an
    ensemble's (E, N, N) cosines the pow is the most expensive op of the training step.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, p: float) -> torch.Tensor:
        return x.pow(p)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p = inputs
        ctx.save_for_backward(x, output)
        ctx.p = p

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        # y/x = x^(p−1); the tiny offset only matters at x = 0 exactly, where y = 0 and the slope is 0
        return (grad * y).div_(x + 1e-30).mul_(ctx.p), None


def _pow(x: torch.Tensor, p: float) -> torch.Tensor:
    """x^p with a cheap backward (for p ≥ 1, where the slope at 0 is 0)."""
    return _Power.apply(x, p) if p >= 1 else x.pow(p)


def separation(z: torch.Tensor, power: float = 100.0, shift: bool = True) -> torch.Tensor:
    """Push every sample away from the others in the batch (by angle).

    Per sample i: Σ_{j≠i} s_ij^p with s_ij = (1 + cos_ij)/2 (shift) or cos_ij (no shift,
    the older cos^10 form). A high power makes it act only on near-collisions.
    """
    u = _unit(z)
    cos = u @ u.transpose(-1, -2)
    s = (1.0 + cos) / 2.0 if shift else cos
    pair = _pow(s, power)
    return pair.sum(-1) - pair.diagonal(dim1=-2, dim2=-1)  # drop j = i


def anchor(z: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Angular anchor: 1 − cos(z, v̂). Zero exactly at the anchor, 2 opposite it."""
    return 1.0 - (_unit(z) * _unit(direction)).sum(-1)


def euclidean_anchor(z: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Older 'polar' anchor: squared distance to a fixed point (no normalisation)."""
    return (z - point).pow(2).sum(-1)


def _dim_mask(z: torch.Tensor, dims: list[int] | tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(z.shape[-1], dtype=z.dtype, device=z.device)
    mask[list(dims)] = 1.0
    return mask


def subspace(z: torch.Tensor, dims: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Energy outside the kept dims: Σ_{d∉D} z_d². Planarity is dims (0, 1)."""
    return (z.pow(2) * (1.0 - _dim_mask(z, dims))).sum(-1)


def anti_anchor(z: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """max(0, cos(z, û)): reserves the hemisphere around û (e.g. û = −red keeps red's opposite empty)."""
    return torch.relu((_unit(z) * _unit(direction)).sum(-1))


def anti_subspace(z: torch.Tensor, dims: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Energy inside dims D: Σ_{d∈D} z_d². Clears D so only the concept uses it."""
    return (z.pow(2) * _dim_mask(z, dims)).sum(-1)


def residual_toward(z: torch.Tensor, dims: list[int] | tuple[int, ...], target: torch.Tensor) -> torch.Tensor:
    """1 − cos(z with dims D zeroed, target): where z lands if D is ablated (method.md §2, deletion).

    With a normalised latent, ablating D leaves the decoder the direction of z's part outside D,
    however small that part is. Pulling it towards `target` (broadcast against z, e.g. the
    greys' centre) decides in training what the deleted concept will decode to. A zero
    target (no reference sample in the batch) gives a constant 1 and no gradient.
    """
    r = z * (1.0 - _dim_mask(z, dims))
    return 1.0 - (_unit(r) * _unit(target)).sum(-1)


def unitarity(z: torch.Tensor) -> torch.Tensor:
    """(‖z‖ − 1)² on a pre-normalisation activation (older runs with no explicit norm)."""
    return (z.norm(dim=-1) - 1.0).pow(2)


def euclidean_repulsion(z: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Per sample: mean over j≠i of 1/(‖z_i − z_j‖² + ε). Pushes points apart in space."""
    d2 = (z.unsqueeze(-2) - z.unsqueeze(-3)).pow(2).sum(-1)
    n = z.shape[-2]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    return ((1.0 - eye) / (d2 + eps)).sum(-1) / max(n - 1, 1)
