"""Permanent deletion: edit the weights on either side of a latent site; return an edited copy.

The site must sit between two `nn.Linear` layers — a producer whose outputs are the site's
dims (optionally followed by parameter-free, per-vector ops such as L2 normalisation) and a
consumer that reads the site's output directly. We find both by running one probe forward
pass and watching which leaf modules fire and which tensors flow between them, so this works
on any model with that layout, not only our autoencoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anchoring.anchor.capture import resolve_site
from anchoring.errors import AnchoringError


def _passes_through(module: nn.Module, inputs: tuple, output: object) -> bool:
    """A parameter-free leaf that only rescales each vector (identity, eval-mode dropout, an L2
    normalisation …) keeps a zeroed dim or a removed direction absent, so it may sit between the
    producing Linear and the site. Checked on the probe pass itself: the output must be a
    positive multiple of the input, vector by vector — an element-wise nonlinearity is not."""
    if any(True for _ in module.parameters()) or not inputs or not isinstance(output, torch.Tensor):
        return False
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.shape != output.shape:
        return False
    cos = F.cosine_similarity(x.flatten(0, -2).double(), output.flatten(0, -2).double(), dim=-1)
    tiny = x.flatten(0, -2).norm(dim=-1) < 1e-12
    return bool(((cos > 1 - 1e-6) | tiny).all())


@dataclass
class Layout:
    producer: str
    consumer: str
    width: int


def _leaf_modules(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules() if n and not list(m.children())}


def find_layout(model: nn.Module, site: str, probe: torch.Tensor) -> Layout:
    """Locate the Linear that writes `site` and the Linear that reads it."""
    site_module = resolve_site(model, site)
    leaves = _leaf_modules(model)
    order: list[tuple[str, nn.Module, tuple, object]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: order.append((leaves[mod], mod, inp, out))) for m in leaves]
    site_out: list[torch.Tensor] = []
    if site_module not in leaves:
        hooks.append(site_module.register_forward_hook(lambda _m, _i, out: site_out.append(out)))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    if site_module in leaves:
        idx = next(i for i, (_, m, _, _) in enumerate(order) if m is site_module)
        out = order[idx][3]
    else:
        if not site_out:
            raise AnchoringError(f"site {site!r} did not run in a forward pass")
        out = site_out[0]
        # the last leaf that ran inside the site module is where the site ends
        inside = {m for m in site_module.modules()}
        idx = max(i for i, (_, m, _, _) in enumerate(order) if m in inside)
    # walk back to the producing Linear through pass-through modules only
    j = idx
    while j >= 0 and not isinstance(order[j][1], nn.Linear):
        if not _passes_through(order[j][1], order[j][2], order[j][3]):
            raise AnchoringError(f"cannot edit weights at {site!r}: {order[j][0]} ({type(order[j][1]).__name__}) "
                                 f"sits between it and the Linear that writes it")
        j -= 1
    if j < 0:
        raise AnchoringError(f"cannot edit weights at {site!r}: no nn.Linear writes it")
    consumer = next((k for k in range(idx + 1, len(order)) if isinstance(order[k][1], nn.Linear) and order[k][2] and order[k][2][0] is out), None)
    if consumer is None:
        raise AnchoringError(f"cannot edit weights at {site!r}: its output is not read directly by an nn.Linear")
    width = order[j][1].out_features
    if order[consumer][1].in_features != width:
        raise AnchoringError(f"cannot edit weights at {site!r}: writer has {width} outputs, reader takes {order[consumer][1].in_features}")
    return Layout(order[j][0], order[consumer][0], width)


def _check_dims(dims: Sequence[int], width: int) -> list[int]:
    d = sorted(set(int(i) for i in dims))
    if not d or d[0] < 0 or d[-1] >= width:
        raise AnchoringError(f"dims {list(dims)} must be within 0..{width - 1}")
    if len(d) == width:
        raise AnchoringError("cannot delete every latent dim")
    return d


def _probe(model: nn.Module) -> torch.Tensor:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return torch.zeros(2, first.in_features)


def ablate(model: nn.Module, dims: Sequence[int], site: str = "latent") -> nn.Module:
    """Zero the producer rows/biases for `dims` and the consumer columns reading them."""
    layout = find_layout(model, site, _probe(model))
    d = _check_dims(dims, layout.width)
    edited = copy.deepcopy(model)
    prod, cons = edited.get_submodule(layout.producer), edited.get_submodule(layout.consumer)
    with torch.no_grad():
        prod.weight[d] = 0.0
        if prod.bias is not None:
            prod.bias[d] = 0.0
        cons.weight[:, d] = 0.0
    return edited


def ablate_direction(model: nn.Module, direction: torch.Tensor, site: str = "latent") -> nn.Module:
    """Project a (not necessarily axis-aligned) direction out of the producer: W ← (I − v̂v̂ᵀ)W.

    The post-hoc baseline's deletion: no anchoring means no dims to cut, only a direction.
    """
    layout = find_layout(model, site, _probe(model))
    v = F.normalize(direction.float(), dim=-1)
    if v.shape != (layout.width,):
        raise AnchoringError(f"direction has {tuple(v.shape)} entries, the site has {layout.width}")
    proj = torch.eye(layout.width) - torch.outer(v, v)
    edited = copy.deepcopy(model)
    prod = edited.get_submodule(layout.producer)
    with torch.no_grad():
        prod.weight.copy_(proj @ prod.weight)
        if prod.bias is not None:
            prod.bias.copy_(proj @ prod.bias)
    return edited


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def prune(model: nn.Module, dims: Sequence[int], site: str = "latent") -> nn.Module:
    """Remove the dims entirely: the latent shrinks by len(dims)."""
    layout = find_layout(model, site, _probe(model))
    d = _check_dims(dims, layout.width)
    keep = [i for i in range(layout.width) if i not in d]
    edited = copy.deepcopy(model)
    prod, cons = edited.get_submodule(layout.producer), edited.get_submodule(layout.consumer)
    new_prod = nn.Linear(prod.in_features, len(keep), bias=prod.bias is not None)
    new_cons = nn.Linear(len(keep), cons.out_features, bias=cons.bias is not None)
    with torch.no_grad():
        new_prod.weight.copy_(prod.weight[keep])
        if prod.bias is not None:
            new_prod.bias.copy_(prod.bias[keep])
        new_cons.weight.copy_(cons.weight[:, keep])
        if cons.bias is not None:
            new_cons.bias.copy_(cons.bias)
    _replace(edited, layout.producer, new_prod)
    _replace(edited, layout.consumer, new_cons)
    if hasattr(edited, "latent_dim"):
        edited.latent_dim = len(keep)
    return edited


@torch.no_grad()
def project_out(model: nn.Module, direction: torch.Tensor, embeddings: Sequence[str], writers: Sequence[str],
                strength: float = 1.0) -> nn.Module:
    """A copy whose residual stream cannot carry `direction`: every embedding table named in
    `embeddings` (rows are vectors in the stream) and every `nn.Linear` in `writers` (outputs are
    added to the stream) is projected off it, `W ← (I − v̂v̂ᵀ)W`. Which modules those are is the
    model's to say; for a normalised residual stream `docs/method.md` explains why nothing else needs
    to change.

    `strength` β in [0, 1] removes only that share of the component, `W ← (I − β v̂v̂ᵀ)W`: a dial
    between no edit and the deletion, so that two deletions can be compared at the same cost."""
    if not 0.0 <= strength <= 1.0:
        raise AnchoringError(f"deletion strength must be in [0, 1], not {strength}")
    m = copy.deepcopy(model)
    v = F.normalize(direction.to(torch.float32), dim=0)
    for name in embeddings:
        w = resolve_site(m, name).weight
        w.sub_(torch.outer(w @ v.to(w.dtype), v.to(w.dtype)), alpha=strength)
    for name in writers:
        lin = resolve_site(m, name)
        if not isinstance(lin, nn.Linear) or lin.out_features != v.numel():
            raise AnchoringError(f"{name!r} is not a Linear writing a {v.numel()}-wide residual stream")
        w = lin.weight
        w.sub_(torch.outer(v.to(w.dtype), v.to(w.dtype) @ w), alpha=strength)
        if lin.bias is not None:
            lin.bias.sub_((lin.bias @ v.to(w.dtype)) * v.to(w.dtype), alpha=strength)
    return m


@torch.no_grad()
def blind_readers(model: nn.Module, direction: torch.Tensor, readers: Sequence[str], strength: float = 1.0) -> nn.Module:
    """A copy in which no `nn.Linear` named in `readers` responds to `direction`: each one's input
    weights are projected off it, `W ← W(I − β v̂v̂ᵀ)`, so `lin(x + t·v̂) = lin(x)` for every x and t
    (at β = 1). The stream may still carry the direction; the modules that read it no longer see it.
    Which modules read the stream where is the model's to say (`residual_readers`); `docs/method.md`
    says why this removes more than the writer-side `project_out` in a normalised stream."""
    if not 0.0 <= strength <= 1.0:
        raise AnchoringError(f"blinding strength must be in [0, 1], not {strength}")
    if not readers:
        raise AnchoringError("nothing to blind: no reader given")
    m = copy.deepcopy(model)
    v = F.normalize(direction.to(torch.float32), dim=0)
    for name in readers:
        lin = resolve_site(m, name)
        if not isinstance(lin, nn.Linear) or lin.in_features != v.numel():
            raise AnchoringError(f"{name!r} is not a Linear reading a {v.numel()}-wide residual stream")
        w = lin.weight
        w.sub_(torch.outer(w @ v.to(w.dtype), v.to(w.dtype)), alpha=strength)
    return m


@torch.no_grad()
def residual_component(model: nn.Module, direction: torch.Tensor, tokens: torch.Tensor, sites: Sequence[str]) -> float:
    """Largest |ĥ·v̂| over the states at `sites` on `tokens`, each state unit-normalised: how much of
    `direction` an edited model still carries. Which sites make up the residual stream is the
    caller's to say (for the normalised transformers: the embedding output and every block's)."""
    from anchoring.anchor.capture import Capture

    v = F.normalize(direction.float(), dim=0)
    with Capture(model, list(sites)) as cap:
        model(tokens)
        return max(float((F.normalize(cap.acts[s].float(), dim=-1) @ v).abs().max()) for s in sites)
