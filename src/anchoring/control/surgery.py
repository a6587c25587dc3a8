"""Permanent deletion: edit the weights on either side of a latent site; return an edited copy.

The site must sit between two `nn.Linear` layers — a producer whose outputs are the site's
dims (optionally followed by parameter-free, per-vector ops such as L2 normalisation) and a
consumer that reads the site's output directly. We find both by running one probe forward
pass and following the tensors that flow between leaf modules, so this works on any model with
that layout, not only our autoencoder.
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

PROBE_ROWS = 64


def _positive_multiple(x: object, y: object) -> bool:
    """Whether `y` is `x` times a positive factor, vector by vector (one factor per sample).

    Only such a map keeps a zeroed dim zero and a removed direction absent, so only it may sit
    between the producing Linear and the site. A zero vector must stay zero, and at least one
    vector must be non-zero: an all-zero probe says nothing about what the map does."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() == 0 or x.shape != y.shape:
        return False
    tol = max(1e-5, 16 * torch.finfo(x.dtype).eps) if x.is_floating_point() else 1e-5
    xs, ys = x.detach().reshape(-1, x.shape[-1]).double(), y.detach().reshape(-1, y.shape[-1]).double()
    nx, ny = xs.norm(dim=-1), ys.norm(dim=-1)
    live = nx > 0
    if not bool(live.any()) or bool((ny[~live] != 0).any()):
        return False
    xh = xs[live] / nx[live, None]
    along = (ys[live] * xh).sum(-1)
    across = (ys[live] - along[:, None] * xh).norm(dim=-1)  # ‖y‖·sin(angle), exact in float64
    return bool(((along > 0) & (across <= tol * ny[live])).all())


@dataclass
class Layout:
    """Where a site sits between two Linears: the `producer` writing its `width` values and the
    `consumer` reading them, the two weights a surgery edits (found by `find_layout`)."""

    producer: str
    consumer: str
    width: int


@dataclass
class _Call:
    """One leaf module call on the probe: the tensors themselves (to follow them by identity) and
    copies taken when the call returned (so a later in-place edit cannot pass unnoticed)."""

    name: str
    module: nn.Module
    inp: object
    out: object
    inp_then: object
    out_then: object


def _snapshot(t: object) -> object:
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _leaf_modules(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules() if n and not list(m.children())}


def _probe_pass(model: nn.Module, site_module: nn.Module, probe: torch.Tensor) -> tuple[list[_Call], list[tuple[int, object]]]:
    """Run `probe` once in eval mode (dropout off, no batch-norm update), recording every leaf call and
    the site module's output. The global RNG is restored afterwards: finding a layout draws nothing."""
    leaves = _leaf_modules(model)
    calls: list[_Call] = []
    site_out: list[tuple[int, object]] = []  # (calls recorded when the site returned, its output)

    def leaf_hook(mod, inp, out):
        first = inp[0] if inp else None
        calls.append(_Call(leaves[mod], mod, first, out, _snapshot(first), _snapshot(out)))

    def site_hook(_mod, _inp, out):
        site_out.append((len(calls), (out, _snapshot(out))))

    hooks = [m.register_forward_hook(leaf_hook) for m in leaves]
    hooks.append(site_module.register_forward_hook(site_hook))
    modes = {m: m.training for m in model.modules()}
    cuda = probe.device.type == "cuda"
    devices = [probe.device.index if probe.device.index is not None else torch.cuda.current_device()] if cuda else []
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model(probe)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return calls, site_out


def find_layout(model: nn.Module, site: str, probe: torch.Tensor | None = None) -> Layout:
    """Locate the Linear that writes `site` and the Linear that reads it.

    The producer is found by following the site's input back, tensor by tensor (`is`, not run
    order: a Linear that ran last may feed another branch), through parameter-free modules that
    only rescale each vector; the site's output must then be a positive multiple of the producer's,
    which also catches functional ops (`torch.sigmoid(...)`) that no hook sees. `probe` defaults to
    a seeded random batch on the model's device and dtype; a zero probe would let an element-wise
    nonlinearity with f(0) = 0 pass as a rescaling."""
    site_module = resolve_site(model, site)
    if probe is not None:
        calls, site_out = _probe_pass(model, site_module, probe)
    else:
        probe = _probe(model)
        try:
            calls, site_out = _probe_pass(model, site_module, probe)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            # most often the model does not take floats of that width (token ids, images); it may also be a
            # bug of the model's own, so the original error stays chained below the one-line message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AnchoringError(f"the model raised {type(e).__name__} on a random {tuple(probe.shape)} batch of floats "
                                 f"({first}); if it does not take floats of that width, pass probe=<one input batch> "
                                 f"to find the Linear that writes {site!r}") from e
    if not site_out:
        raise AnchoringError(f"site {site!r} did not run in a forward pass")
    ended, (out, out_then) = site_out[0]
    if site_module in _leaf_modules(model):
        j = next(i for i, c in enumerate(calls) if c.module is site_module)
    else:
        # the leaf call whose output the site returns; failing that (a functional op ends the site),
        # the last leaf that ran inside it, and the positive-multiple check below must vouch for the rest
        inside = set(site_module.modules())
        j = next((i for i in reversed(range(ended)) if calls[i].out is out), None)
        if j is None:
            j = next((i for i in reversed(range(ended)) if calls[i].module in inside), None)
        if j is None:
            raise AnchoringError(f"cannot edit weights at {site!r}: no nn.Linear writes it")
    # walk back to the producing Linear through pass-through modules only, each fed by the one before
    while not isinstance(calls[j].module, nn.Linear):
        c = calls[j]
        if not _positive_multiple(c.inp_then, c.out_then):
            if c.module is site_module:  # the site itself computes its output: there is no Linear's rows to cut
                raise AnchoringError(f"cannot edit weights at {site!r}: the site's own module ({type(c.module).__name__}) "
                                     f"computes its output; only an nn.Linear's output, or a rescaling of it, can be cut")
            raise AnchoringError(f"cannot edit weights at {site!r}: {c.name} ({type(c.module).__name__}) "
                                 f"sits between it and the Linear that writes it")
        j = next((i for i in reversed(range(j)) if calls[i].out is c.inp), None)
        if j is None:
            raise AnchoringError(f"cannot edit weights at {site!r}: no nn.Linear writes it "
                                 f"(the input of {c.name} comes from no module)")
    producer = calls[j]
    if not _positive_multiple(producer.out_then, out_then):
        raise AnchoringError(f"cannot edit weights at {site!r}: its output is not the output of {producer.name} "
                             f"rescaled vector by vector (another branch or a functional op sits between them)")
    consumer = next((c for c in calls[ended:] if isinstance(c.module, nn.Linear) and c.inp is out
                     and isinstance(c.inp_then, torch.Tensor) and torch.equal(c.inp_then, out_then)), None)
    if consumer is None:
        raise AnchoringError(f"cannot edit weights at {site!r}: its output is not read directly by an nn.Linear")
    width = producer.module.out_features
    if consumer.module.in_features != width:
        raise AnchoringError(f"cannot edit weights at {site!r}: writer has {width} outputs, reader takes {consumer.module.in_features}")
    return Layout(producer.name, consumer.name, width)


def _check_dims(dims: Sequence[int], width: int) -> list[int]:
    d = sorted(set(int(i) for i in dims))
    if not d or d[0] < 0 or d[-1] >= width:
        raise AnchoringError(f"dims {list(dims)} must be within 0..{width - 1}")
    if len(d) == width:
        raise AnchoringError("cannot delete every latent dim")
    return d


def _probe(model: nn.Module) -> torch.Tensor:
    """A seeded random batch for the model's first Linear, on its device and in its dtype. Random, not
    zero, so that a nonlinearity shows itself; seeded by its own generator, so the global RNG (and so
    whatever the caller draws next) is left alone."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise AnchoringError("cannot edit weights: the model has no nn.Linear")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, first.in_features, generator=g, dtype=torch.float64)
    return x.to(device=first.weight.device, dtype=first.weight.dtype)


def _unit(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`direction` scaled to unit length, in `like`'s dtype and on its device. A zero direction is
    refused: normalising it gives 0, and projecting 0 out would leave the model as it was, silently."""
    norm = float(direction.detach().double().norm())
    if not norm > 1e-12:  # also refuses NaN
        raise AnchoringError(f"the direction to remove has norm {norm:.3g}: there is no direction to remove")
    return F.normalize(direction.detach().to(device=like.device, dtype=like.dtype), dim=-1)


def ablate(model: nn.Module, dims: Sequence[int], site: str = "latent", probe: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` with the producer rows/biases for `dims` and the consumer columns reading
    them zeroed; `model` itself is not changed, so use the returned copy.

    `probe` is one input batch for the model, needed when it does not take floats of its first
    Linear's width (token ids, images): the layout is found by running it once (see `find_layout`)."""
    layout = find_layout(model, site, probe)
    d = _check_dims(dims, layout.width)
    edited = copy.deepcopy(model)
    prod, cons = edited.get_submodule(layout.producer), edited.get_submodule(layout.consumer)
    with torch.no_grad():
        prod.weight[d] = 0.0
        if prod.bias is not None:
            prod.bias[d] = 0.0
        cons.weight[:, d] = 0.0
    return edited


def ablate_direction(model: nn.Module, direction: torch.Tensor, site: str = "latent",
                     probe: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` with a (not necessarily axis-aligned) direction projected out of the
    producer, W ← (I − v̂v̂ᵀ)W; `model` itself is not changed.

    The post-hoc baseline's deletion: no anchoring means no dims to cut, only a direction.
    `probe` as in `ablate`.
    """
    layout = find_layout(model, site, probe)
    if tuple(direction.shape) != (layout.width,):
        raise AnchoringError(f"direction has {tuple(direction.shape)} entries, the site has {layout.width}")
    edited = copy.deepcopy(model)
    prod = edited.get_submodule(layout.producer)
    v = _unit(direction, prod.weight)
    with torch.no_grad():
        prod.weight.sub_(torch.outer(v, v @ prod.weight))
        if prod.bias is not None:
            prod.bias.sub_((prod.bias @ v) * v)
    return edited


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear on `old`'s device and in its dtype: `skip_init` draws nothing, so
    pruning does not shift the global RNG, and the caller fills every parameter anyway."""
    new = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=old.bias is not None,
                                   device=old.weight.device, dtype=old.weight.dtype)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    return new


def prune(model: nn.Module, dims: Sequence[int], site: str = "latent", probe: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` with the dims removed entirely: the latent shrinks by len(dims). `probe` as in `ablate`."""
    layout = find_layout(model, site, probe)
    d = _check_dims(dims, layout.width)
    keep = [i for i in range(layout.width) if i not in d]
    edited = copy.deepcopy(model)
    prod, cons = edited.get_submodule(layout.producer), edited.get_submodule(layout.consumer)
    new_prod = _linear_like(prod, prod.in_features, len(keep))
    new_cons = _linear_like(cons, len(keep), cons.out_features)
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
    _unit(direction, direction.float())  # refuse a zero direction before copying anything
    m = copy.deepcopy(model)
    width = direction.numel()
    for name in embeddings:
        w = resolve_site(m, name).weight
        v = _unit(direction, w)
        w.sub_(torch.outer(w @ v, v), alpha=strength)
    for name in writers:
        lin = resolve_site(m, name)
        if not isinstance(lin, nn.Linear) or lin.out_features != width:
            raise AnchoringError(f"{name!r} is not a Linear writing a {width}-wide residual stream")
        w = lin.weight
        v = _unit(direction, w)
        w.sub_(torch.outer(v, v @ w), alpha=strength)
        if lin.bias is not None:
            lin.bias.sub_((lin.bias @ v) * v, alpha=strength)
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
    _unit(direction, direction.float())  # refuse a zero direction before copying anything
    m = copy.deepcopy(model)
    width = direction.numel()
    for name in readers:
        lin = resolve_site(m, name)
        if not isinstance(lin, nn.Linear) or lin.in_features != width:
            raise AnchoringError(f"{name!r} is not a Linear reading a {width}-wide residual stream")
        w = lin.weight
        v = _unit(direction, w)
        w.sub_(torch.outer(w @ v, v), alpha=strength)
    return m


@torch.no_grad()
def residual_component(model: nn.Module, direction: torch.Tensor, tokens: torch.Tensor, sites: Sequence[str]) -> float:
    """Largest |ĥ·v̂| over the states at `sites` on `tokens`, each state unit-normalised: how much of
    `direction` an edited model still carries. Which sites make up the residual stream is the
    caller's to say (for the normalised transformers: the embedding output and every block's)."""
    from anchoring.anchor.capture import Capture

    v = _unit(direction, direction.float())
    with Capture(model, list(sites)) as cap:
        model(tokens)
        return max(float((F.normalize(cap.acts[s].float(), dim=-1) @ v).abs().max()) for s in sites)
