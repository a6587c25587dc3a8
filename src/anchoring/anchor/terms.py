"""Regularizer terms: a formula bound to a site, a schedule weight, and a sample selection.

A concept term averages over the batch's samples labelled for that concept and is exactly
0 when none are (method.md §2); 'unlabelled' averages over the rest; 'all' over everything.
Written without data-dependent branches so it runs under vmap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence, get_args

import torch

from anchoring.anchor import regularizers as R
from anchoring.errors import AnchoringError

Select = Literal["labelled", "unlabelled", "all"]


class Labeller(Protocol):
    """How a domain labels samples for a concept; the method reads only these two."""

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """p(concept | x) per sample, which the sparse noisy labels are drawn from."""
        ...

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """The reference label per sample (0/1), for evaluation only."""
        ...


@dataclass(frozen=True)
class Concept:
    """A named concept: how samples get labelled for it, and where it should live.

    `labeller` is any object with `probability(x)` and `exact(x)` (a `Labeller`);
    `anchor` is a direction in latent space, `dims` a subspace; either may be absent.
    """

    name: str
    labeller: Labeller
    anchor: tuple[float, ...] | None = None
    dims: tuple[int, ...] | None = None


@dataclass
class Term:
    """A regularizer as configured: its formula's `kind`, the schedule column of its `weight`, the
    `site` it reads; the trainer binds these to tensors."""

    name: str
    kind: str
    weight: str
    site: str
    formula: Callable[[torch.Tensor], torch.Tensor]
    concept: str | None = None
    select: Select = "all"
    params: dict = field(default_factory=dict)
    toward: str | None = None
    width: int | None = None  # the latent width the term was built for (`latent_dim`)

    def __call__(self, acts: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch loss `(...)` from activations `(..., N, D)` and labels `(..., N)`."""
        if self.site not in acts:
            raise AnchoringError(f"term {self.name!r} reads site {self.site!r}; the activations given hold "
                                 f"{', '.join(map(repr, acts)) or 'none'}")
        needs = [c for c in (None if self.select == "all" else self.concept, self.toward) if c is not None]
        for c in needs:
            if c not in labels:
                raise AnchoringError(f"term {self.name!r} needs labels for concept {c!r}; the labels given are for "
                                     f"{', '.join(map(repr, labels)) or 'none'}")
        z = acts[self.site]
        if self.width is not None and z.shape[-1] != self.width:  # not torch's broadcast error, or a silent wrong loss
            raise AnchoringError(f"term {self.name!r} was built for a latent of {self.width} dims; {self.site!r} "
                                 f"gives {z.shape[-1]}")
        if self.toward is None:
            per_sample = self.formula(z)
        else:
            per_sample = self.formula(z, target=reference_centre(z, labels[self.toward], self.params["dims"]).unsqueeze(-2))
        if self.select == "all":
            return per_sample.mean(-1)
        w = labels[self.concept]
        if not w.is_floating_point():  # bool or integer 0/1 labels: weights, so 1 − w must be arithmetic
            w = w.to(per_sample.dtype)
        check_weights(w, self.name, self.concept)
        if w.shape != per_sample.shape and not _labels_fit(w.shape, per_sample.shape):
            raise AnchoringError(f"term {self.name!r}: labels of shape {tuple(w.shape)} do not match the "
                                 f"{tuple(per_sample.shape)} samples of {self.site!r} (one label per sample)")
        if self.select == "unlabelled":
            w = 1.0 - w
        return (per_sample * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def check_weights(w: torch.Tensor, term: str, concept: str | None) -> None:
    """Refuse labels outside [0, 1]: a label of 2 would count a sample twice, and a negative one
    would push the "unlabelled" side (1 − w) past 1, both without any error.

    Checked where it costs nothing: on CPU, outside `torch.compile` and with labels that `vmap`
    does not batch. On a GPU the check would stall every step waiting for the device, so labels
    that live there are the caller's to keep in range.
    """
    if w.device.type != "cpu" or torch.compiler.is_compiling():
        return
    try:
        bad = bool(((w < 0) | (w > 1) | w.isnan()).any())
    except RuntimeError as e:  # labels batched by vmap: a Python bool of them is not defined there
        if "vmap" not in str(e):
            raise
        return
    if bad:
        lo, hi = float(w.nan_to_num(0.5).min()), float(w.nan_to_num(0.5).max())
        raise AnchoringError(f"term {term!r}: labels for concept {concept!r} must lie in [0, 1] (weights of a "
                             f"sample), got values from {lo:g} to {hi:g}{' and NaN' if bool(w.isnan().any()) else ''}")


def _labels_fit(labels: torch.Size, samples: torch.Size) -> bool:
    """One label per sample along the last dim; leading dims may broadcast (labels shared by the
    members of an ensemble). A single label, or (N, 1) against N samples, would broadcast into a
    sum over samples, not a mean."""
    if not labels or labels[-1] != samples[-1]:
        return False
    try:
        return torch.broadcast_shapes(labels, samples) == samples
    except RuntimeError:
        return False


def reference_centre(z: torch.Tensor, weights: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Unit mean `(..., D)` of the weighted samples' unit latents with `dims` zeroed, detached.

    Detached so a term pulling towards it moves only the samples it scores, not the reference
    samples (e.g. the greys stay where reconstruction put them). Zero when no sample has weight.
    """
    u = R._unit(z.detach())
    u = u * (1.0 - R._dim_mask(u, dims))
    centre = (u * weights.unsqueeze(-1)).sum(-2)
    return centre / centre.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# kind -> (formula, needs direction, needs dims, default selection when tied to a concept)
KINDS: dict[str, tuple[Callable, bool, bool, Select]] = {
    "separation": (R.separation, False, False, "all"),
    "anchor": (R.anchor, True, False, "labelled"),
    "euclidean-anchor": (R.euclidean_anchor, True, False, "labelled"),
    "subspace": (R.subspace, False, True, "labelled"),
    "anti-anchor": (R.anti_anchor, True, False, "all"),
    "anti-subspace": (R.anti_subspace, False, True, "all"),
    "residual-toward": (R.residual_toward, False, True, "labelled"),
    "unitarity": (R.unitarity, False, False, "all"),
    "euclidean-repulsion": (R.euclidean_repulsion, False, False, "all"),
}
OPTIONS = {"separation": {"power", "shift"}, "euclidean-repulsion": {"eps"}}


def build_term(
    kind: str,
    weight: str,
    *,
    latent_dim: int,
    site: str = "latent",
    concept: Concept | None = None,
    select: Select | None = None,
    direction: Sequence[float] | None = None,
    dims: Sequence[int] | None = None,
    name: str | None = None,
    toward: Concept | None = None,
    **options,
) -> Term:
    """Validate one term's settings and bind its formula; every mistake names the term."""
    if kind not in KINDS:
        raise AnchoringError(f"unknown regularizer {kind!r} (known: {', '.join(KINDS)})")
    formula, needs_dir, needs_dims, default_select = KINDS[kind]
    label = name or (f"{kind}:{concept.name}" if concept else kind)
    bad = set(options) - OPTIONS.get(kind, set())
    if bad:
        raise AnchoringError(f"term {label!r}: option(s) {sorted(bad)} do not apply to {kind}")
    if select is not None and select not in get_args(Select):
        raise AnchoringError(f"term {label!r}: select={select!r} is not one of {', '.join(get_args(Select))}")
    select = select or (default_select if concept else "all")
    if select != "all" and concept is None:
        raise AnchoringError(f"term {label!r}: select={select!r} needs a concept")
    for given, needed, what in ((direction, needs_dir, "a direction"), (dims, needs_dims, "dims")):
        if given is not None and not needed:  # trained without it, and nothing would say so
            raise AnchoringError(f"term {label!r}: {kind} takes no {what.removeprefix('a ')}; remove it")
    bound: dict = dict(options)
    if needs_dir:
        vec = direction if direction is not None else (concept.anchor if concept else None)
        if vec is None:
            raise AnchoringError(f"term {label!r}: {kind} needs a direction (or a concept with an anchor)")
        if len(vec) != latent_dim:
            raise AnchoringError(f"term {label!r}: direction has {len(vec)} entries, latent has {latent_dim}")
        t = torch.tensor([float(x) for x in vec])
        if kind != "euclidean-anchor" and float(t.norm()) == 0.0:
            raise AnchoringError(f"term {label!r}: direction must be non-zero")
        bound["direction" if kind != "euclidean-anchor" else "point"] = t
    if needs_dims:
        d = dims if dims is not None else (concept.dims if concept else None)
        if d is None:
            raise AnchoringError(f"term {label!r}: {kind} needs dims (or a concept with dims)")
        if not d or any(not 0 <= int(i) < latent_dim for i in d):
            raise AnchoringError(f"term {label!r}: dims {list(d)} must be within 0..{latent_dim - 1}")
        bound["dims"] = tuple(int(i) for i in d)
    if (kind == "residual-toward") != (toward is not None):
        raise AnchoringError(f"term {label!r}: 'toward' (a reference concept) is needed by residual-toward and only by it")
    if kind == "residual-toward" and concept is None:
        raise AnchoringError(f"term {label!r}: residual-toward needs a concept (whose residual it moves)")

    def bound_formula(z: torch.Tensor, _f=formula, _kw=bound, **extra) -> torch.Tensor:
        kw = {k: (v.to(z) if isinstance(v, torch.Tensor) else v) for k, v in _kw.items()}
        return _f(z, **kw, **extra)

    return Term(label, kind, weight, site, bound_formula, concept.name if concept else None, select, bound,
                toward.name if toward else None, latent_dim)
