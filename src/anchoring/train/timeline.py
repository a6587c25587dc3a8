"""A run's timeline from its dopesheet, checked against what the objective needs (any kind)."""

from __future__ import annotations

from anchoring.errors import AnchoringError
from anchoring.schedule import Timeline, parse_dopesheet

SCHEDULED = ("lr",)  # non-regularizer columns every schedule must provide


def parse_schedule(schedule: str, source: str, weights: list[str], optional: tuple[str, ...] = ()) -> Timeline:
    """The dopesheet, with its columns checked against the term weights both ways, naming the column."""
    timeline = parse_dopesheet(schedule, source=source)
    used = set(weights) | set(SCHEDULED) | set(optional)
    for col in timeline.names:
        if col not in used:
            raise AnchoringError(f"schedule column {col!r} is not used by any term (term weights: {', '.join(weights) or 'none'}; "
                                 f"other columns: {', '.join([*SCHEDULED, *optional])})")
    for col in [*SCHEDULED, *weights]:
        if col not in timeline.tracks:
            raise AnchoringError(f"schedule has no column {col!r} (needed by {'the optimiser' if col in SCHEDULED else 'a term'})")
    low = min(v for _, v in timeline.tracks["lr"].key_values())
    if low < 0:
        raise AnchoringError(f"{source}: lr must be ≥ 0 at every key, got {low:g}")
    for col in dict.fromkeys(weights):  # a negative weight rewards the term: red pushed off its anchor, repulsion unbounded
        low = min(v for _, v in timeline.tracks[col].key_values())
        if low < 0:
            raise AnchoringError(f"{source}: term weight {col!r} must be ≥ 0 at every key, got {low:g} (a negative "
                                 f"weight rewards what the term penalises; use the opposite term instead)")
    return timeline


def fit_steps(timeline: Timeline, steps: int | None) -> Timeline:
    """Stretch the timeline to `steps` when the run asks for another length."""
    if steps is not None and steps != timeline.steps:
        return timeline.rescaled(steps)
    return timeline
