"""Control: interventions at inference (hooks) and permanent deletion (surgery)."""

from anchoring.control.falloff import (
    BezierMapper,
    BoundedPower,
    Constant,
    FalloffMapper,
    Linear,
    parse_falloff,
)
from anchoring.control.interventions import (
    Intervention,
    concept_alpha,
    intervene,
    keeping_norm,
    matched_random,
    repel,
    suppress,
    suppress_subspace,
    zero_dims,
)
from anchoring.control.surgery import ablate, ablate_direction, find_layout, prune

__all__ = [
    "BezierMapper", "BoundedPower", "Constant", "FalloffMapper", "Intervention", "Linear", "ablate",
    "ablate_direction", "concept_alpha", "find_layout", "intervene", "keeping_norm", "matched_random", "parse_falloff", "prune", "repel",
    "suppress", "suppress_subspace", "zero_dims",
]
