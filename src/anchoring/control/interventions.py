"""Inference-time interventions on activations, applied at a named site with a `with` block.

α = max(0, ẑ·v̂): the concept's cosine, zero on the far hemisphere, so the opposite of the
concept (cyan for red) is untouched by construction.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchoring.anchor.capture import resolve_site
from anchoring.control.falloff import (
    BezierMapper,
    BoundedPower,
    Constant,
    FalloffMapper,
)
from anchoring.errors import AnchoringError


def concept_alpha(z: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return torch.relu((F.normalize(z, dim=-1) * F.normalize(direction, dim=-1)).sum(-1))


def suppress(z: torch.Tensor, direction: torch.Tensor, falloff: Callable = Constant()) -> torch.Tensor:
    """z' = z − g(α)·(z·v̂)⁺·v̂; on a unit latent this is ẑ − g(α)·α·v̂ (g ≡ 1: plain projection).

    Points with α = 0 come back bit-identical.
    """
    _check_width(z, direction, "direction")
    v = F.normalize(direction.to(z), dim=-1)
    along = torch.relu((z * v).sum(-1, keepdim=True))
    alpha = along / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return z - falloff(alpha) * along * v


def suppress_subspace(z: torch.Tensor, basis: torch.Tensor, falloff: Callable = Constant()) -> torch.Tensor:
    """z' = z − g(α)·Pz, with P the projection onto the rows of `basis` (orthonormal) and α = ‖Pz‖/‖z‖.

    A concept anchored in a subspace counts its energy there, Σ z_d², whatever the signs, so unlike a
    direction it has no half-space to spare: the whole component goes (g ≡ 1). Points with no
    component come back bit-identical."""
    _check_width(z, basis, "basis")
    b = basis.to(z)
    pz = (z @ b.T) @ b
    alpha = torch.linalg.vector_norm(pz, dim=-1, keepdim=True) / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-12)
    return z - falloff(alpha) * pz


def _check_width(z: torch.Tensor, v: torch.Tensor, what: str) -> None:
    """One line naming both widths, instead of torch's broadcasting error from deep inside the hook. A
    direction is one vector: an (N, D) one would edit each of N rows along its own row, unasked."""
    if what == "direction" and v.dim() != 1:
        raise AnchoringError(f"the direction must be one vector of {z.shape[-1]} entries, not of shape {tuple(v.shape)}")
    if v.shape[-1] != z.shape[-1]:
        raise AnchoringError(f"the {what} has {v.shape[-1]} entries, the activations it edits {z.shape[-1]}")
    if what == "direction" and not bool(v.any()):  # it would normalise to zero and edit nothing, without a word
        raise AnchoringError("the direction is zero; an edit needs a direction to remove")


def _orthogonal_fallback(v: torch.Tensor) -> torch.Tensor:
    """A unit vector ⟂ v, for points exactly on the concept axis (no 'away' direction of their own)."""
    basis = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    e = basis[(v.abs()).argmin()]
    w = e - (e @ v) * v
    return F.normalize(w, dim=-1)


def repel(z: torch.Tensor, direction: torch.Tensor, mapper: Callable = FalloffMapper()) -> torch.Tensor:
    """Rotate z away from v̂ to cosine m(α), keeping its norm and its orthogonal direction.

    Only where α > 0; elsewhere z passes bit-identical.
    """
    _check_width(z, direction, "direction")
    v = F.normalize(direction.to(z), dim=-1)
    length = z.norm(dim=-1, keepdim=True)
    u = z / length.clamp_min(1e-12)
    cos = (u * v).sum(-1, keepdim=True)
    w = u - cos * v
    # near the axis u − cos·v cancels and leaves rounding error that is not ⟂ v; a second pass removes
    # it (only there, so states away from the axis keep their exact numbers)
    w = torch.where(w.norm(dim=-1, keepdim=True) < 1e-2, w - (w * v).sum(-1, keepdim=True) * v, w)
    w_norm = w.norm(dim=-1, keepdim=True)
    w_hat = torch.where(w_norm > 1e-6, w / w_norm.clamp_min(1e-12), _orthogonal_fallback(v))
    m = mapper(cos.clamp_min(0.0)).clamp(-1.0, 1.0)
    moved = (m * v + (1.0 - m * m).clamp_min(0.0).sqrt() * w_hat) * length
    return torch.where(cos > 0, moved, z)


def keeping_norm(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`edit`, with each output vector rescaled to its input's length.

    For a residual stream that lives on the unit sphere (a normalised transformer): there the
    length is not free, since the unembedding reads it as the logits' scale. Projecting a component
    out shortens the state, which flattens the next-token distribution wherever the component was
    large, and that raises the loss there whatever the direction meant. Keeping the length leaves
    only the change of direction. States the edit leaves alone come back bit-identical (x·(‖x‖/‖x‖)
    is x exactly); a state the edit sends to zero (one lying on the removed direction) stays zero,
    since it has no direction left to keep.
    """

    def edit_on_sphere(z: torch.Tensor) -> torch.Tensor:
        out = edit(z)
        before = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        after = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
        return out * torch.where(after > 0, before / after.clamp_min(torch.finfo(after.dtype).tiny), 0.0)

    return edit_on_sphere


def matched_random(edit: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator,
                   avoid: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The control for `edit`: each vector is turned by the same angle `edit` turns it, but towards a
    random direction orthogonal to the vector, to the edit's own displacement and to every row of
    `avoid` (the concept's directions), and keeps its length.

    For one direction, the displacement already spans it. A subspace edit removes the state's
    projection onto the subspace, which is one direction of it per state: without `avoid`, the random
    turn could add concept energy along the subspace's other directions, so pass the subspace's basis.

    A hook that removes a concept also moves states, and a state moved by any large angle may cost
    loss whatever the direction. This control moves the same states by the same angles without
    aiming at the concept, so comparing the two separates what the direction did from what moving
    by that much did. States the edit leaves alone come back bit-identical, and one the edit sends
    to zero gets the edit's zero (it has no angle to match). The random directions come from
    `generator` (drawn on the CPU, so every device gets the same numbers): the same generator state
    and the same input shapes give the same control. Computed in float32 whatever the input's type.
    """

    if avoid is not None and avoid.shape[-1] < len(avoid) + 2:
        raise AnchoringError(f"a matched random move needs a direction orthogonal to the state and to {len(avoid)} "
                             f"concept directions: width {avoid.shape[-1]} has none to spare")

    def moved_at_random(z: torch.Tensor) -> torch.Tensor:
        out = edit(z)
        x, y = z.float(), out.float()
        tiny = torch.finfo(torch.float32).tiny
        length = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        u = x / length.clamp_min(tiny)
        along = (u * y).sum(-1, keepdim=True)
        across = y - along * u  # the output's part ⟂ the input: its size gives sin of the turn, exact for small turns
        size = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(tiny)
        cos, sin = along / size, torch.linalg.vector_norm(across, dim=-1, keepdim=True) / size
        r = torch.randn(z.shape, generator=generator).to(z.device)
        if avoid is None:
            for w in (u, across):  # ⟂ the vector, then ⟂ the edit's displacement (its part ⟂ the vector)
                w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(tiny)
                r = r - (r * w).sum(-1, keepdim=True) * w
        else:  # ⟂ the vector, the avoided directions and the displacement, per state, by Gram–Schmidt in
            # float64. The displacement comes last: for an edit inside the avoided span it adds nothing,
            # and its float32 rounding, blown up to unit length, would be a direction that moves with
            # the last bits of z. A column with less than 1e-3 of its length left is dropped for that reason.
            # The displacement's rounding is about 1e-7 of the output's length whatever the turn, so its
            # floor also has a term in ‖y‖; the concept's rows are exact and need none.
            done = [u.double()]
            noise = 64 * torch.finfo(torch.float32).eps * size.double()
            columns = [(a.expand_as(u), 0.0) for a in avoid.to(device=z.device)] + [(across, noise)]
            for w, floor in columns:
                w = w.double()
                full = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
                for q in done:
                    w = w - (w * q).sum(-1, keepdim=True) * q
                n = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
                done.append(torch.where(n > 1e-3 * full + floor, w / n.clamp_min(tiny), 0.0))
            r = r.double()
            for q in done:
                r = r - (r * q).sum(-1, keepdim=True) * q
            r = r.float()
        r = r / torch.linalg.vector_norm(r, dim=-1, keepdim=True).clamp_min(tiny)
        turned = ((cos * u + sin * r) * length).to(z.dtype)
        moved = (out != z).any(-1, keepdim=True)
        zeroed = (out == 0).all(-1, keepdim=True)
        return torch.where(moved, torch.where(zeroed, out, turned), z)

    return moved_at_random


def zero_dims(z: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """`z` with `dims` set to 0, as a copy: the activation-level twin of ablation, to compare a hook
    with the weight edit it stands for."""
    out = z.clone()
    out[..., list(dims)] = 0.0
    return out


@dataclass(frozen=True)
class Intervention:
    """A named edit of activations: `method` ∈ suppress | repel | zero."""

    method: str
    direction: tuple[float, ...] | None = None
    dims: tuple[int, ...] | None = None
    shape: BoundedPower | Constant | BezierMapper | FalloffMapper = field(default_factory=Constant)

    def __post_init__(self) -> None:
        # a zero direction normalises to zero, and the edit would then change nothing without a word
        if self.method != "zero" and self.direction is not None and not any(self.direction):
            raise AnchoringError(f"{self.method}: the direction is zero; an edit needs a direction to remove")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.method == "zero":
            assert self.dims is not None
            return zero_dims(z, self.dims)
        assert self.direction is not None
        v = torch.tensor(self.direction, dtype=z.dtype)
        if self.method == "suppress":
            return suppress(z, v, self.shape)
        shape = self.shape if isinstance(self.shape, (BezierMapper, FalloffMapper)) else FalloffMapper(self.shape)
        return repel(z, v, shape)


@contextmanager
def intervene(model: nn.Module, site: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[nn.Module]:
    """While open, `site`'s output is replaced by `edit(output)` in every forward pass (a module that
    returns a tuple, such as `nn.GRU` or `nn.MultiheadAttention`: its first item, as `Capture` reads it).

    Hooks run in the order they were registered: a `Capture` of the same site opened *inside* this
    block records the edited output, one opened before it the output as the model computed it.
    A block in which `model` ran a forward pass but `site` never did (a module used only through its
    weights, such as `nn.MultiheadAttention.out_proj`) raises on exit, since nothing was edited."""
    module = resolve_site(model, site)
    calls = {"site": 0, "model": 0}

    def hook(_m, _i, out):
        calls["site"] += 1
        if isinstance(out, tuple):
            return (edit(out[0]), *out[1:])
        return edit(out)

    def count(_m, _i, _o):
        calls["model"] += 1

    handles = [module.register_forward_hook(hook)]
    if module is not model:
        handles.append(model.register_forward_hook(count))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
    if calls["model"] and not calls["site"]:
        raise AnchoringError(f"{site!r} never ran in the {calls['model']} forward pass(es) of this block, so nothing "
                             f"was edited: its parent uses it through its weights, not by calling it; hook a module "
                             f"that runs")
