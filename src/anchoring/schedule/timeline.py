"""All hyperparameters over a run: tracks plus named phases and one-off actions."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from anchoring.errors import AnchoringError
from anchoring.schedule.track import Track


@dataclass
class Timeline:
    """step → {name: value}; `steps` is the run length (last step + 1 for a dopesheet)."""

    tracks: dict[str, Track]
    steps: int
    phases: list[tuple[int, str]] = field(default_factory=list)  # (start step, name), sorted
    actions: dict[int, list[str]] = field(default_factory=dict)
    _table: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise AnchoringError(f"a timeline needs at least 1 step, got {self.steps}")
        self.phases = sorted(self.phases)

    @property
    def names(self) -> list[str]:
        return list(self.tracks)

    def values(self, step: int) -> dict[str, float]:
        return {name: track(step) for name, track in self.tracks.items()}

    def table(self) -> np.ndarray:
        """`(steps, len(names))` float64 values, computed once and reused by the training loop."""
        if self._table is None:
            self._table = np.array(
                [[track(t) for track in self.tracks.values()] for t in range(self.steps)], dtype=np.float64
            ).reshape(self.steps, len(self.tracks))
        return self._table

    def retarget(self, name: str, at: int, value: float, until: int) -> None:
        """Reactive change of one track's goal (see `Track.retarget`); cached table rebuilt lazily."""
        if name not in self.tracks:
            raise AnchoringError(f"no schedule column {name!r} (have: {', '.join(self.tracks)})")
        self.tracks[name].retarget(at, value, until)
        self._table = None

    def phase_at(self, step: int) -> str | None:
        starts = [s for s, _ in self.phases]
        i = bisect.bisect_right(starts, step) - 1
        return self.phases[i][1] if i >= 0 else None

    def actions_at(self, step: int) -> list[str]:
        return self.actions.get(step, [])

    def rescaled(self, steps: int) -> "Timeline":
        """Stretch every keyframe, phase and action to a run of `steps` steps."""
        if steps < 1:
            raise AnchoringError(f"steps must be a positive integer, got {steps}")
        factor = (steps - 1) / max(self.steps - 1, 1)
        scale = lambda t: int(round(t * factor))  # noqa: E731
        actions: dict[int, list[str]] = {}
        for t, acts in self.actions.items():
            actions.setdefault(scale(t), []).extend(acts)
        return Timeline(
            {n: tr.rescaled(factor) for n, tr in self.tracks.items()},
            steps,
            [(scale(t), p) for t, p in self.phases],
            actions,
        )
