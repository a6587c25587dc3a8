"""Route the gradients of labelled positions through the anchor: at a site, the positions a mask marks
pass gradients back to earlier layers only along the concept's directions.

Why: an anchor term alone lets the model *write* the concept onto its axis while it keeps computing
the concept everywhere else, so removing the axis removes a tag, not the capability. With the route,
whatever the labelled positions teach the layers before the site can only arrive through the axis:
the earlier layers learn to carry the concept there, and the layers after the site learn to read it
there. Forward values are unchanged, so the route costs nothing at inference and needs no edit.
This is gradient routing (Cloud et al. 2024) applied to a residual-stream subspace chosen before
training, rather than to a set of parameters.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from anchoring.anchor.basis import orthonormal
from anchoring.anchor.capture import resolve_site
from anchoring.errors import AnchoringError


def route_along(h: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`h` `(…, T, D)` unchanged in value; where `mask` `(…, T)` is true, its gradient keeps only the
    component in the span of `basis` `(k, D)`, orthonormal rows."""
    par = (h @ basis.T) @ basis
    perp = h - par
    m = mask.unsqueeze(-1).to(h.dtype)
    return h - m * (perp - perp.detach())


class RouteThrough:
    """Context manager: forward hooks at `sites` that apply `route_along` with the current `mask`.

    Set `.mask` `(B, T)` before each forward; with `mask = None` the hooks pass outputs through."""

    def __init__(self, model: nn.Module, sites: Iterable[str], directions: Sequence[torch.Tensor]) -> None:
        self.modules = [resolve_site(model, s) for s in sorted(set(sites))]
        basis = orthonormal(directions)  # orthonormal rows spanning the directions (repeats dropped)
        if not basis:
            raise AnchoringError("a route needs at least one non-zero direction")
        self.basis = torch.stack(basis)
        self.mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, _module: nn.Module, _inputs: tuple, output):
        # an all-false mask routes nothing (route_along returns h exactly); the shortcut is skipped under
        # torch.compile, where branching on a tensor's value would split the graph at every site
        if self.mask is None or (not torch.compiler.is_compiling() and not self.mask.any()):
            return None
        h = output[0] if isinstance(output, tuple) else output
        routed = route_along(h, self.basis.to(h.device, h.dtype), self.mask.to(h.device))
        return (routed, *output[1:]) if isinstance(output, tuple) else routed

    def __enter__(self) -> "RouteThrough":
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.mask = None
