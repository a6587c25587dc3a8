"""Figure-only experiments: nothing is trained, a report of figures is drawn."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from anchoring.config import ExperimentBase, LobeConfig


class FiguresExperiment(ExperimentBase):
    """kind = "figures": colour spaces (1.1), timing functions (1.4) or intervention lobes (2.1)."""

    kind: Literal["figures"] = "figures"
    figures: Literal["colour-spaces", "transitions", "lobes"] = Field(description="which set of figures to draw")
    lobes: list[LobeConfig] = Field(default_factory=list, description="falloffs/mappers to draw (figures = 'lobes')")

    @model_validator(mode="after")
    def _lobes(self) -> "FiguresExperiment":
        if self.figures == "lobes" and not self.lobes:
            raise ValueError("figures = 'lobes' needs [[lobes]] entries")
        return self
