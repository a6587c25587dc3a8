"""Gradient masks by parameter entry: let one part of the loss change only chosen weights.

Two unlearning baselines train this way. Selective gradient masking (SGTM, Shilov et al. 2025)
designates a few "forget" entries per block (one attention head, a slice of MLP units); labelled
data may update only those, everything else updates all weights, and the forget entries are
zeroed after training. Gradient routing (ERA, Cloud et al. 2024) adds MLP units in early layers
that alone receive the gradients of labelled tokens and are ablated after training. Both reduce
to: the gradient of the labelled loss, multiplied entry by entry by a mask, plus the full
gradient of the rest. Nothing here knows a model: masks are keyed by parameter name.
"""

from __future__ import annotations

import torch

ParamMasks = dict[str, torch.Tensor]  # parameter name → bool tensor of its shape (True = may learn from labelled data)


def masked_backward(labelled: torch.Tensor, rest: torch.Tensor, params: dict[str, torch.Tensor], masks: ParamMasks) -> None:
    """Accumulate into `.grad`: ∇rest on every entry, plus ∇labelled only where `masks` is True.

    A parameter without a mask learns nothing from the labelled loss. A parameter that neither loss
    reaches keeps `.grad` as it was (None stays None), as `backward()` would leave it, so an optimiser
    skips it instead of stepping on a zero gradient (Adam's moments would still move it)."""
    names = [n for n, p in params.items() if p.requires_grad]
    plist = [params[n] for n in names]
    g_rest = torch.autograd.grad(rest, plist, retain_graph=True, allow_unused=True)
    g_lab = torch.autograd.grad(labelled, plist, allow_unused=True)
    for name, p, gr, gl in zip(names, plist, g_rest, g_lab):
        gl = gl * masks[name].to(gl.dtype) if gl is not None and name in masks else None
        if gr is None and gl is None:
            continue
        g = gl if gr is None else gr.clone() if gl is None else gr + gl
        p.grad = g if p.grad is None else p.grad + g


@torch.no_grad()
def zero_entries(params: dict[str, torch.Tensor], masks: ParamMasks) -> None:
    """Zero every masked entry (SGTM's deletion after training)."""
    for name, m in masks.items():
        params[name].masked_fill_(m, 0.0)
