"""Where a colour experiment's terms and edits attach, checked on a freshly built model.

A wrong `site` used to pass validation and fail only once a term or an edit first read it:
in the first training step (after the run folder was written) or after the last one (after
every step had been paid for, and again on every `resume`). One probe forward on an untrained
model of the configured shape finds each site's width in milliseconds, before anything is
written.
"""

from __future__ import annotations

import torch
from torch import nn

from anchoring.anchor import Capture, Term, resolve_site
from anchoring.domains.colour import named_rgb
from anchoring.errors import AnchoringError
from anchoring.kinds.colour.config import ColourExperiment
from anchoring.kinds.colour.objective import Objective, build_model
from anchoring.kinds.colour.plan import make_plan


def site_width(model: nn.Module, site: str) -> int:
    """Width of `site`'s output for a probe colour; an AnchoringError listing the modules when
    the model has no such module, or when it gives no tensor to read."""
    resolve_site(model, site)
    with torch.no_grad(), Capture(model, [site]) as cap:
        model(torch.zeros(1, 3))
        out = cap.acts.get(site)  # read inside: leaving the block clears what was captured
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise AnchoringError(f"site {site!r} gives no activations to read")
    return int(out.shape[-1])


def check_term_site(term: Term, width: int) -> None:
    """A term's direction must be as wide as its site, and its dims inside it. Terms with
    neither (separation, unitarity, …) read any width, so any existing module will do."""
    vec = term.params.get("direction", term.params.get("point"))
    if vec is not None and len(vec) != width:
        raise AnchoringError(f"term {term.name!r}: site {term.site!r} has width {width}, but its direction has "
                             f"{len(vec)} entries (the latent width); use a site as wide as the latent (e.g. site = \"latent\")")
    dims = term.params.get("dims")
    if dims and max(dims) >= width:
        raise AnchoringError(f"term {term.name!r}: dims {list(dims)} are outside site {term.site!r} "
                             f"(width {width}, dims 0..{width - 1})")


def check_edit_site(owner: str, site: str, width: int, latent_dim: int) -> None:
    """Edits resolve their direction and dims against the latent, so the site must carry the latent
    (be exactly as wide); `owner` names what asked: "intervention 'x'" in a config, or --site."""
    if width != latent_dim:
        raise AnchoringError(f"{owner}: site {site!r} has width {width}, not the latent width {latent_dim}; "
                             f"interventions act on the latent (site latent)")


def check_sites(cfg: ColourExperiment, objective: Objective) -> None:
    """Every term's and every configured intervention's site, on one model built as training
    builds it; each edit is then tried once on that model, so what only the evaluation after
    training would find (a surgery site with no Linear on either side) is found now."""
    with torch.random.fork_rng(devices=[]):  # initialising the probe model draws nothing from the caller's stream
        model = build_model(cfg).eval()
    widths: dict[str, int] = {}

    def width(site: str, owner: str) -> int:
        if site not in widths:
            try:
                widths[site] = site_width(model, site)
            except AnchoringError as e:
                raise AnchoringError(f"{owner}: {e}") from None
        return widths[site]

    for term in objective.terms:
        check_term_site(term, width(term.site, f"term {term.name!r}"))
    for spec in cfg.interventions:
        owner = f"intervention {spec.name!r}"
        check_edit_site(owner, spec.site, width(spec.site, owner), cfg.model.latent_dim)
        plan = make_plan(spec, objective.concepts, cfg.model.latent_dim)
        try:
            plan.reconstruct([model])(named_rgb())
        except AnchoringError as e:
            msg = str(e)
            raise AnchoringError(msg if msg.startswith("intervention ") else f"intervention {spec.name!r}: {msg}") from None
