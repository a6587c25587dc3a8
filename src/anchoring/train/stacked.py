"""Fast path for ensembles of plain MLP chains: stacked weights and batched matmuls, no vmap.

`torch.func.vmap` over `functional_call` re-traces the module's Python on every call; for a
model of a few tiny layers that dispatch overhead dominates the step. When a model is just a
chain of supported layers, one `baddbmm` per Linear over the stacked `(E, out, in)` weights
does the same arithmetic with a fraction of the dispatches. Which models qualify is decided
twice: structurally (every leaf is a known, hook-free layer) and numerically (a probe forward
must match the generic vmap path), so a model whose `forward` is not the chain of its leaves
falls back to the generic path instead of training the wrong function.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Stacked = dict[str, torch.Tensor]


def _linear(prefix: str) -> Callable[[torch.Tensor, Stacked], torch.Tensor]:
    w, b = f"{prefix}weight", f"{prefix}bias"

    def f(x: torch.Tensor, p: Stacked) -> torch.Tensor:
        if b in p:
            return torch.baddbmm(p[b].unsqueeze(1), x, p[w].transpose(1, 2))
        return torch.bmm(x, p[w].transpose(1, 2))

    return f


def _elementwise(module: nn.Module) -> Callable[[torch.Tensor, Stacked], torch.Tensor] | None:
    if isinstance(module, nn.GELU):
        approx = module.approximate
        return lambda x, _p: F.gelu(x, approximate=approx)
    if isinstance(module, nn.ReLU):
        return lambda x, _p: torch.relu(x)
    if isinstance(module, nn.Tanh):
        return lambda x, _p: torch.tanh(x)
    if isinstance(module, nn.Sigmoid):
        return lambda x, _p: torch.sigmoid(x)
    if isinstance(module, (nn.Identity, nn.Dropout)) and not (isinstance(module, nn.Dropout) and module.p > 0):
        return lambda x, _p: x
    if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
        # parameter-free per-vector ops (e.g. an L2 normalisation) act on (E, N, D) as on (N, D);
        # the numeric probe in `try_stacked` rejects any whose forward does not
        return lambda x, _p: module(x)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


class StackedChain:
    """The model's leaves applied in registration order, over stacked weights `(E, ...)`.

    `__call__(params, x)` returns `(output, acts)` where `acts[site]` is the output of the
    module named `site` (a container's output is its last leaf's), like `Capture` would see.
    """

    def __init__(self, model: nn.Module, sites: list[str]) -> None:
        leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
        if not leaves:
            raise ValueError("model has no layers")
        self.steps: list[Callable[[torch.Tensor, Stacked], torch.Tensor]] = []
        for name, m in leaves:
            if _has_hooks(m):
                raise ValueError(f"{name} has hooks")
            if isinstance(m, nn.Linear):
                self.steps.append(_linear(f"{name}."))
            else:
                f = _elementwise(m)
                if f is None or list(m.parameters(recurse=False)):
                    raise ValueError(f"{name}: {type(m).__name__} is not supported by the stacked path")
                self.steps.append(f)
        order = {n: i for i, (n, _) in enumerate(leaves)}
        self.emit: dict[int, list[str]] = {}
        for site in sites:  # a site's output is produced by its last leaf
            inside = [order[n] for n in order if n == site or n.startswith(site + ".")]
            if not inside:
                raise ValueError(f"site {site!r} holds no layer")
            self.emit.setdefault(max(inside), []).append(site)

    def __call__(self, params: Stacked, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        acts: dict[str, torch.Tensor] = {}
        for i, step in enumerate(self.steps):
            x = step(x, params)
            for site in self.emit.get(i, ()):
                acts[site] = x
        return x, acts


def try_stacked(model: nn.Module, sites: list[str], params: Stacked, buffers: Stacked,
                generic: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                in_features: int | None) -> StackedChain | None:
    """A `StackedChain` when the model qualifies and reproduces the generic path on a probe; else None."""
    if buffers or _has_hooks(model) or in_features is None:
        return None
    try:
        chain = StackedChain(model, sites)
    except ValueError:
        return None
    e = next(iter(params.values())).shape[0]
    probe = torch.linspace(-1.0, 1.0, 7 * in_features).reshape(1, 7, in_features).expand(e, -1, -1).contiguous()
    with torch.no_grad():
        try:
            out, acts = chain(params, probe)
        except RuntimeError:
            return None
        ref_out, ref_acts = generic(probe)
    same = out.shape == ref_out.shape and torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4)
    same = same and all(torch.allclose(acts[s], ref_acts[s], atol=1e-5, rtol=1e-4) for s in sites)
    return chain if same else None
