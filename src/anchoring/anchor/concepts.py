"""Concepts from their specs: a labeller from the domain, an anchor direction or axis, dims."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

from anchoring.anchor.terms import Concept
from anchoring.config import ConceptConfig
from anchoring.errors import AnchoringError


def build_concepts(specs: Sequence[ConceptConfig], width: int, labellers: Callable[[str], Any]) -> dict[str, Concept]:
    """Concepts by name, with anchors checked against the width of the space they live in.

    `labellers(name)` gives the domain's labeller of that name (the method knows no domain)."""
    concepts: dict[str, Concept] = {}
    for c in specs:
        if c.name in concepts:
            raise AnchoringError(f"concept {c.name!r} is defined twice")
        if c.anchor is not None and c.axis is not None:
            raise AnchoringError(f"concept {c.name!r}: give an anchor or an axis, not both")
        anchor = tuple(c.anchor) if c.anchor else None
        if c.axis is not None:
            if c.axis >= width:
                raise AnchoringError(f"concept {c.name!r}: axis {c.axis} is outside 0..{width - 1}")
            anchor = tuple(1.0 if i == c.axis else 0.0 for i in range(width))
        if anchor is not None and len(anchor) != width:
            raise AnchoringError(f"concept {c.name!r}: anchor has {len(anchor)} entries but the anchored space has {width} dims "
                                 f"(give the anchor {width} entries, or an axis)")
        labeller = labellers(c.labeller or c.name)
        if c.label_scale is not None:
            labeller = replace(labeller, scale=c.label_scale)
        dims = tuple(c.dims) if c.dims else ((c.axis,) if c.axis is not None else None)
        concepts[c.name] = Concept(c.name, labeller, anchor, dims)
    return concepts
