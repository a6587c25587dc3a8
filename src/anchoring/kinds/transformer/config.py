"""The colour transformer's config (M3): the colour language, the model, its evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from anchoring.config import TrainConfig, TrainedExperiment, _Strict


class LanguageConfig(_Strict):
    """The synthetic colour language of the transformer experiments."""

    levels: int = Field(6, ge=2, le=10, description="lattice levels per channel: levels³ colour tokens (at most 10: a "
                        "colour is written with one digit per channel)")
    mix_rule: Literal["exact", "half-up"] = Field("exact", description="'exact': only pairs whose mean lands on the "
                                                                      "lattice; 'half-up': all pairs, rounded half up")
    held_out: float = Field(0.2, ge=0.0, lt=1.0, description="share of unordered mix pairs never trained on")
    split_seed: int = Field(1234, ge=0, lt=2**63)  # seeds a torch generator (a signed 64-bit integer)
    op_weights: tuple[float, float, float] = Field((0.5, 0.25, 0.25), description="mix, complement, lighten")
    context: int = Field(64, ge=8, le=1024)
    batch_size: int = Field(16, ge=1, le=4096)

    @field_validator("op_weights")
    @classmethod
    def _weights(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        """Relative frequencies of the three operations: none negative, and some operation drawn at all."""
        if min(v) < 0 or sum(v) <= 0:
            raise ValueError(f"op_weights are relative frequencies: each ≥ 0, not all 0, got {list(v)}")
        return v


class TransformerConfig(_Strict):
    width: int = Field(64, ge=8)
    layers: int = Field(4, ge=1, le=48)
    heads: int = Field(8, ge=1)
    mlp_ratio: int = Field(2, ge=1, le=8)
    alpha: float = Field(0.2, gt=0, description="initial step size α of every block")
    logit_scale: float = Field(10.0, gt=0)
    control: bool = Field(True, description="also train an unanchored control on the same seeds and batches")
    judge: bool = Field(True, description="mark the M3 targets met or missed; false reports the same figures "
                        "without a verdict (an anchor the targets were not set for, as in the attention keys)")
    workers: int = Field(0, ge=0, description="processes training models side by side (0: one per CPU core; 1: in this process)")
    eval_lines: int = Field(2048, ge=64, description="lines per evaluation set")
    reddest: int = Field(10, ge=1, description="'red' equations: answer among the N reddest colours")
    redish: float = Field(0.3, gt=0, le=1, description="an operand or answer with redness ≥ this is 'red-ish'")

    @model_validator(mode="after")
    def _heads(self) -> "TransformerConfig":
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of even size")
        return self


class TransformerEvaluateConfig(_Strict):
    concept: str | None = Field(None, description="anchored concept whose direction is measured and edited "
                                                "(default: the experiment's first concept)")


class TransformerExperiment(TrainedExperiment):
    """kind = "transformer": a normalised transformer on the colour language, anchored arm + control."""

    kind: Literal["transformer"] = "transformer"
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: TransformerEvaluateConfig = Field(default_factory=TransformerEvaluateConfig)
