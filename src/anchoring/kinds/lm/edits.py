"""Edits of an LM run's models along a concept direction: suppression through hooks at residual
sites, deletion of the direction from the weights that write the stream, and blinding of the weights
that read it after the anchored site (both permanent: no hook needed afterwards).

By default the direction is the anchored arm's own anchor (or its subspace's axes) at the anchored
sites; `edited(..., directions=…, sites=…)` applies the same code to any directions, such as the
post-hoc ones fitted on the control arm (`kinds.lm.posthoc`)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from anchoring.anchor.basis import orthonormal
from anchoring.control import Constant, Intervention, intervene, keeping_norm, matched_random, suppress_subspace
from anchoring.control.surgery import blind_readers, project_out
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.direction import anchored_sites, measured_direction

EDITS = ("suppress", "delete", "blind")
Edit = Callable[[torch.Tensor], torch.Tensor]


def concept_directions(cfg: LMExperiment) -> list[torch.Tensor]:
    """The concept's anchor, or one basis axis per dim of its subspace."""
    v, dims = measured_direction(cfg, fallback=False)
    if v is not None:
        return [v / v.norm()]
    return [torch.eye(cfg.lm.width)[d] for d in dims]


class Suppressed(nn.Module):
    """A model whose sites are edited on every forward: by default the concept's half-space is
    projected out along each direction (`Intervention("suppress", …)` with the falloff `shape`);
    `edits` gives a site its own edit instead (LEACE's eraser, say).

    `keep_norm` (default: the model's `unit_residual` flag) rescales every state a direction's
    half-space projection edits to its old length (`control.keeping_norm`). A normalised
    transformer's unembedding reads the last state's length as the logits' scale, so without it an
    edit that removes a large component also makes the model less sure of every next token there,
    and the loss rises for that reason alone. With the default (constant) falloff the edited state's
    component along the direction is 0, and the rescale keeps it 0. Hooks given in `edits` run
    exactly as given: they are maps defined by a property of their output (the LEACE eraser
    equalises the class means; the mean-difference hook caps h·v at the class midpoint), which a
    rescale would undo.

    `random_control` (a seed) turns the direction hooks into their matched control
    (`control.matched_random`): every state they would edit is turned by the same angle towards a
    random direction instead, so its row says how much loss an untargeted move of the same size
    costs.

    `subspace` (a concept anchored in k dims): each site's directions span one subspace, whose whole
    component is removed (`control.suppress_subspace`), both signs: the subspace term counts energy,
    so a labelled state may sit at −e_d as well as at +e_d."""

    def __init__(self, model: nn.Module, sites: list[str], directions: list[torch.Tensor] | Mapping[str, list[torch.Tensor]],
                 shape=None, edits: Mapping[str, Edit] | None = None, keep_norm: bool | None = None,
                 random_control: int | None = None, subspace: bool = False) -> None:
        super().__init__()
        self.inner, self.sites = model, sites
        self.keep_norm = bool(getattr(model, "unit_residual", False)) if keep_norm is None else keep_norm
        per_site = directions if isinstance(directions, Mapping) else {s: directions for s in sites}
        self.directions = {s: list(per_site.get(s, [])) for s in sites}
        self.shape = shape if shape is not None else Constant()
        self.edits = dict(edits or {})
        self.context = getattr(model, "context", None)
        self.random_control, self.subspace = random_control, subspace
        if random_control is not None and self.edits:
            raise AnchoringError("the matched random control is defined for the direction hooks, not for hooks given in `edits`")

    @torch.no_grad()
    def normalize_weights(self) -> None:
        """The inner model's own renormalisation, if it has one: fine-tuning the model with the hook in
        place (the relearning attack on a hook) keeps its weights where its training kept them."""
        if hasattr(self.inner, "normalize_weights"):
            self.inner.normalize_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        g = None if self.random_control is None else torch.Generator().manual_seed(self.random_control)
        with ExitStack() as stack:
            for site in self.sites:
                if site in self.edits:
                    stack.enter_context(intervene(self.inner, site, self.edits[site]))
                    continue
                if not self.directions.get(site):  # nothing to remove at this site
                    continue
                basis = torch.stack(orthonormal(self.directions[site]))
                if self.subspace:
                    edits: list[Edit] = [lambda z, b=basis: suppress_subspace(z, b, self.shape)]
                else:
                    edits = [Intervention("suppress", tuple(v.tolist()), None, self.shape) for v in self.directions[site]]
                # the control's random turn avoids every concept direction at the site; one direction is
                # already avoided by the displacement, and its numbers stay those of the plain control
                avoid = basis if len(basis) > 1 else None
                for edit in edits:
                    edit = keeping_norm(edit) if self.keep_norm else edit
                    stack.enter_context(intervene(self.inner, site, edit if g is None else matched_random(edit, g, avoid)))
            return self.inner(tokens)


def matched_directions(directions: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """As many directions as `directions` span, drawn at random and orthogonal to that span: deleting
    them is the deletion's control, since every removed direction costs the model something, whether
    or not it held the concept. A concept on basis axes gets other basis axes, because only a basis
    axis is removed exactly (a slanted direction leaks back through the per-dimension step α); any
    other concept gets random orthonormal directions orthogonal to its span."""
    basis = orthonormal(directions)
    if not basis:
        raise AnchoringError("nothing to match: no direction given")
    width = basis[0].numel()
    if len(basis) >= width:
        raise AnchoringError(f"the concept spans all {width} dims: no direction is left to match it with")
    if all(float(b.abs().max()) == 1.0 for b in basis):
        axes = {int(b.abs().argmax()) for b in basis}
        others = [d for d in range(width) if d not in axes]
        pick = torch.randperm(len(others), generator=generator)[: len(basis)]
        return [torch.eye(width)[others[int(i)]] for i in pick]
    q = torch.stack(basis).double()
    draws = torch.randn(len(basis), width, generator=generator, dtype=torch.float64)
    draws = draws - (draws @ q.T) @ q  # off the concept's span
    return orthonormal(list(draws))


def delete(model: nn.Module, directions: Sequence[torch.Tensor], strength: float = 1.0) -> nn.Module:
    """A copy with the span of `directions` removed from the embeddings and every residual writer:
    the directions are orthonormalised first, then each basis vector is projected out in turn; a
    model that keeps its weights on the unit sphere (`normalize_weights`) is put back there, so the
    edited model is one its own training could have produced, and fine-tuning it (the relearning
    attack) does not begin with a jump from the renormalisation. `strength` < 1 removes only that
    share of each component (`surgery.project_out`): the dial that matches two deletions' costs."""
    embeddings, writers = model.residual_writers()
    return _per_basis_vector(model, directions, lambda m, v: project_out(m, v, embeddings, writers, strength), "delete")


def _per_basis_vector(model: nn.Module, directions: Sequence[torch.Tensor],
                      one: Callable[[nn.Module, torch.Tensor], nn.Module], what: str) -> nn.Module:
    """`one` (a copying weight edit along one unit vector) applied for each vector of an orthonormal
    basis of `directions`, then the model put back on the sphere, as after every training step: the
    projection shortened the rows or columns it touched, and rescaling them keeps their component
    along each vector at exactly 0."""
    out = model
    for v in orthonormal(directions):
        out = one(out, v)
    if out is model:
        raise AnchoringError(f"nothing to {what}: no direction given")
    if hasattr(out, "normalize_weights"):
        with torch.no_grad():
            out.normalize_weights()
    return out.eval()


def downstream_readers(model: nn.Module, site: str) -> list[str]:
    """Every Linear that reads the residual stream at or after residual site `site` (`residual_readers`)."""
    by_site = model.residual_readers()
    order = list(by_site)
    if site not in by_site:
        raise AnchoringError(f"site {site!r} is not a residual site of this model ({', '.join(order)})")
    return [r for s in order[order.index(site):] for r in by_site[s]]


def first_site(model: nn.Module, sites: Sequence[str]) -> str:
    """The earliest of `sites` in the model's residual order (names sort "blocks.10" before "blocks.2");
    a name that is not a residual site comes first, so that `downstream_readers` refuses it."""
    if not sites:
        raise AnchoringError("blind needs a residual site to blind the readers after; this run anchors nothing")
    order = list(model.residual_readers())
    return min(sites, key=lambda s: order.index(s) if s in order else -1)


def blind(model: nn.Module, directions: Sequence[torch.Tensor], sites: Sequence[str], strength: float = 1.0) -> nn.Module:
    """A copy in which every matrix that reads the stream after the first of `sites` is blind to the
    span of `directions` (`surgery.blind_readers`, basis vector by basis vector), put back on the
    sphere as `delete` does. The layers up to that site, and the stream itself, keep the direction:
    what the anchor holds is still written, but nothing downstream can use it (`docs/method.md`,
    "LM blinding")."""
    readers = downstream_readers(model, first_site(model, sites))
    return _per_basis_vector(model, directions, lambda m, v: blind_readers(m, v, readers, strength), "blind")


def edited(model: nn.Module, cfg: LMExperiment, edit: str, *,
           directions: list[torch.Tensor] | Mapping[str, list[torch.Tensor]] | None = None,
           sites: list[str] | None = None, shape=None, edits: Mapping[str, Edit] | None = None,
           keep_norm: bool | None = None, random_control: int | None = None) -> nn.Module:
    """`model` under `edit` (suppress | delete | blind). Default: the anchored arm's own anchor at the
    anchored sites (blind: the readers after the first of them). `directions` (one list for every
    site, or a list per site), `sites`, the suppression falloff `shape` (`control.falloff`; Constant
    by default) and per-site hook `edits` override that;
    `keep_norm` and `random_control` (suppress only) as in `Suppressed`."""
    if edit not in EDITS:
        raise AnchoringError(f"--edit must be one of {', '.join(EDITS)}, not {edit!r}")
    subspace = directions is None and measured_direction(cfg)[0] is None  # the run's own concept, anchored in k dims
    directions = concept_directions(cfg) if directions is None else directions
    if edit == "suppress":
        sites = sites if sites is not None else anchored_sites(cfg)
        if not sites:
            raise AnchoringError("this run anchors nothing, so there is no site to suppress at")
        return Suppressed(model, sites, directions, shape, edits, keep_norm, random_control, subspace).eval()
    if random_control is not None:
        raise AnchoringError(f"the matched random control is a hook: it goes with suppress, not {edit}")
    flat = [v for vs in directions.values() for v in vs] if isinstance(directions, Mapping) else list(directions)
    if edit == "blind":
        return blind(model, flat, sites if sites is not None else anchored_sites(cfg))
    return delete(model, flat)

