"""A colour run's edits: from an intervention spec to edited models (one place that knows every
method's wiring), and the relearning attack's colours and post-hoc baseline direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from anchoring.anchor import Concept
from anchoring.config import InterventionConfig
from anchoring.control.erasure import mean_difference
from anchoring.control.falloff import BezierMapper, parse_falloff
from anchoring.control.interventions import Intervention, intervene
from anchoring.control.surgery import ablate, prune
from anchoring.errors import AnchoringError

SURGERY = {"ablate": ablate, "prune": prune}


@dataclass
class Plan:
    """An intervention spec resolved against a run's concepts: the direction or dims it acts on, and
    whether it is a hook on activations or a surgery on weights."""

    spec: InterventionConfig
    direction: tuple[float, ...] | None
    dims: tuple[int, ...] | None

    @property
    def is_surgery(self) -> bool:
        return self.spec.method in SURGERY

    def edit_activation(self) -> Intervention:
        """The hook's edit, with its falloff (a Bézier mapper is refused except for repel)."""
        shape = parse_falloff(self.spec.falloff)
        if isinstance(shape, BezierMapper) and self.spec.method != "repel":
            raise AnchoringError(f"intervention {self.spec.name!r}: a Bézier mapper only applies to repel")
        return Intervention(self.spec.method, self.direction, self.dims, shape)

    def edit_models(self, models: Sequence[nn.Module]) -> list[nn.Module]:
        """Edited copies (surgery only)."""
        fn = SURGERY[self.spec.method]
        return [fn(m, self.dims, self.spec.site) for m in models]

    def reconstruct(self, models: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
        """`rgb (N, 3) → (seeds, N, 3)` through the edited models."""
        if self.is_surgery:
            edited = self.edit_models(models)
            return lambda x: torch.stack([m(x) for m in edited])
        edit = self.edit_activation()

        def run(x: torch.Tensor) -> torch.Tensor:
            outs = []
            for m in models:
                with intervene(m, self.spec.site, edit):
                    outs.append(m(x))
            return torch.stack(outs)

        return run


def make_plan(spec: InterventionConfig, concepts: Sequence[Concept], latent_dim: int) -> Plan:
    """Resolve direction/dims from the concept when not given; every gap is an error naming the spec."""
    if spec.method == "blind":
        raise AnchoringError(f"intervention {spec.name!r}: blind is an LM edit (`anchoring delete --method blind` on an LM run)")
    by_name = {c.name: c for c in concepts}
    concept = None
    if spec.concept is not None:
        if spec.concept not in by_name:
            raise AnchoringError(f"intervention {spec.name!r}: unknown concept {spec.concept!r} (have: {', '.join(by_name) or 'none'})")
        concept = by_name[spec.concept]
    direction = concept.anchor if concept else None
    if spec.dims is not None and spec.method in ("suppress", "repel"):  # they act along the anchor: dims would be ignored
        raise AnchoringError(f"intervention {spec.name!r}: {spec.method} acts along the concept's anchor; dims apply to "
                             f"zero, ablate and prune")
    if spec.dims is not None and len(set(spec.dims)) != len(spec.dims):
        raise AnchoringError(f"intervention {spec.name!r}: dims {list(spec.dims)} name a dim twice")
    dims = tuple(spec.dims) if spec.dims is not None else None
    if dims is None and concept is not None:
        if concept.anchor is not None:
            dims = tuple(i for i, x in enumerate(concept.anchor) if x != 0)
        elif concept.dims is not None:
            dims = tuple(concept.dims)
    if spec.method in ("suppress", "repel") and direction is None:
        raise AnchoringError(f"intervention {spec.name!r}: {spec.method} needs a concept with an anchor")
    if spec.method in ("zero", "ablate", "prune"):
        if not dims:
            raise AnchoringError(f"intervention {spec.name!r}: {spec.method} needs dims (or a concept to take them from)")
        if any(not 0 <= d < latent_dim for d in dims):
            raise AnchoringError(f"intervention {spec.name!r}: dims {list(dims)} must be within 0..{latent_dim - 1}")
    if isinstance(parse_falloff(spec.falloff), BezierMapper) and spec.method != "repel":  # before training, not after
        raise AnchoringError(f"intervention {spec.name!r}: a Bézier mapper only applies to repel")
    # options the edit would not use, refused rather than recorded with its result as if applied
    if spec.method in SURGERY and spec.falloff != "constant":
        raise AnchoringError(f"intervention {spec.name!r}: {spec.method} edits the weights at full strength; a falloff "
                             f"applies to suppress and repel")
    if spec.sites is not None:
        raise AnchoringError(f"intervention {spec.name!r}: sites apply to transformer experiments; use site")
    return Plan(spec, direction, dims)


def concept_samples(labeller, pool: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K distinct colours drawn from `pool` with probability ∝ p(concept | colour)."""
    p = labeller.probability(pool).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(p / p.sum(), k, replacement=False, generator=g)
    return pool[idx]


def post_hoc_direction(encode, labeller, pool: torch.Tensor) -> torch.Tensor:
    """Mean latent of exactly-labelled colours minus mean of the rest, unit length.

    `encode(rgb)` gives the site's activations; use the pre-normalisation site so the
    direction can be projected out of the producing layer's weights.
    """
    with torch.no_grad():
        z = encode(pool)
    return mean_difference(z, labeller.exact(pool))
