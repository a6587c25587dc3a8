"""The colour autoencoder's config: its model, data grid, evaluation, reactive parameters, studies."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from anchoring.config import TrainConfig, TrainedExperiment, VariantConfig, _Strict


class ModelConfig(_Strict):
    latent_dim: int = Field(4, ge=1, le=64, description="bottleneck width E")
    hidden: list[int] = Field(default_factory=lambda: [16], description="hidden layer widths (encoder; decoder mirrors)")
    normalize: bool = Field(True, description="L2-normalise the bottleneck")
    output: Literal["linear", "sigmoid"] = "linear"

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("hidden widths must be positive")
        return v


class DataConfig(_Strict):
    space: Literal["rgb", "hsv"] = "rgb"
    rgb_levels: int = Field(8, ge=2, le=64, description="training grid: rgb_levels³ points")
    hsv_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = Field((36, 10, 10), description="hue×sat×val grid when space = 'hsv'")
    weights: Literal["uniform", "chroma"] = Field("uniform", description="per-point sampling weights")
    batch_size: int = Field(64, ge=2, le=65536)
    validation_levels: int = Field(10, ge=2, le=64, description="validation grid: levels³ RGB points")


class ReactiveConfig(_Strict):
    """Steer a schedule column from a metric (e.g. raise a weight until its loss is below target)."""

    param: str = Field(description="schedule column to steer")
    metric: str = Field(description="metric to watch: loss, recon, or a term's name")
    target: float
    keep: Literal["below", "above"] = "below"
    every: int = Field(100, ge=1, description="decide every N steps, on the median over seeds of the window's mean")
    factor: float = Field(1.5, gt=1.0)
    lowest: float = 0.0
    highest: float | None = Field(None, description="ceiling for the parameter (none by default)")
    ease: int = Field(50, ge=1, description="steps each re-targeted transition takes")
    relax: bool = Field(False, description="also lower the parameter when the metric is satisfied")

    @model_validator(mode="after")
    def _bounds(self) -> "ReactiveConfig":
        if not math.isfinite(self.lowest) or self.lowest < 0:
            raise ValueError(f"reactive {self.param!r}: lowest must be a finite number ≥ 0, got {self.lowest:g}")
        if self.highest is not None and not self.highest >= self.lowest:  # NaN too
            raise ValueError(f"reactive {self.param!r}: highest ({self.highest:g}) must be ≥ lowest ({self.lowest:g})")
        return self


class EvaluateConfig(_Strict):
    concept: str | None = Field("red", description="anchored concept whose direction is checked")
    min_cosine: float = Field(0.9, ge=-1.0, le=1.0, description="anchoring criterion: cos(latent of the pure concept colour, anchor)")
    hue_dims: tuple[int, int] = (0, 1)
    hue_order: bool = Field(True, description="require the hues in order around hue_dims for a seed to count as anchored")
    select: Literal["all", "pareto"] = Field("all", description="'pareto': tables and the CLI also show the edits on the seeds "
                                                                "of the Pareto front (validation reconstruction, anchoring loss, "
                                                                "selectivity); the summary always has both")


class ColourTrainConfig(TrainConfig):
    snapshot_every: int = Field(100, ge=0, description="latent snapshot interval (0: off)")
    term_masks: list[list[bool]] | None = Field(None, description="per member, which terms are on (for term-subset studies)")
    fast: bool = Field(True, description="use the stacked-matmul path when the model supports it (same numbers, faster)")

    @model_validator(mode="after")
    def _masks(self) -> "ColourTrainConfig":
        if self.term_masks is not None and len(self.term_masks) != len(self.member_seeds()):
            raise ValueError(f"term_masks has {len(self.term_masks)} rows for {len(self.member_seeds())} members")
        return self


class ColourExperiment(TrainedExperiment):
    """kind = "colour": an ensemble of colour autoencoders (M1, M2), optionally wrapped in a study."""

    kind: Literal["colour"] = "colour"
    study: Literal["compare", "combinations"] | None = Field(
        None, description="'compare': each of `variants` on the same seeds; 'combinations': every non-empty subset "
                          "of the terms in `combine`, in one ensemble")
    combine: list[str] = Field(default_factory=list, description="term names whose subsets a 'combinations' study trains")
    variants: list[VariantConfig] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: ColourTrainConfig = Field(default_factory=ColourTrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    reactive: list[ReactiveConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _study_fields_where_they_apply(self) -> "ColourExperiment":
        """Fields only one study reads, refused elsewhere rather than ignored without a word."""
        if self.variants and self.study != "compare":
            raise ValueError(f"[[variants]] are trained by study = \"compare\" only (study is {self.study!r})")
        if self.combine and self.study != "combinations":
            raise ValueError(f"combine is read by study = \"combinations\" only (study is {self.study!r})")
        if self.study == "combinations" and self.interventions:
            raise ValueError("a combinations study runs no [[interventions]] (its members are subsets, not one model); "
                             "drop them, or run the edits on a plain run")
        return self

    @model_validator(mode="after")
    def _mask_rows_name_every_term(self) -> "ColourExperiment":
        """A mask row shorter or longer than the term list would fail only once training starts,
        after the run's folder is written."""
        rows = self.train.term_masks or []
        bad = next((len(r) for r in rows if len(r) != len(self.terms)), None)
        if bad is not None:
            raise ValueError(f"train.term_masks rows must have one entry per term ({len(self.terms)}), got one of {bad}")
        return self
