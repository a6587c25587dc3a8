"""Experiment configuration: validated at the boundary, resolved into one re-runnable TOML.

A spec on disk may name its schedule as a CSV file next to it; the resolved config carries
the dopesheet text inline, so a run directory's `config.toml` re-runs with nothing else.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from anchoring.errors import AnchoringError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    hsv_shape: tuple[int, int, int] = Field((36, 10, 10), description="hue×sat×val grid when space = 'hsv'")
    weights: Literal["uniform", "chroma"] = Field("uniform", description="per-point sampling weights")
    batch_size: int = Field(64, ge=2, le=65536)
    validation_levels: int = Field(10, ge=2, le=64, description="validation grid: levels³ RGB points")


class ConceptConfig(_Strict):
    name: str
    labeller: str | None = Field(None, description="labeller name; defaults to the concept's name")
    label_scale: float | None = Field(None, gt=0, le=1, description="override the labeller's scale (p = scale·score^power)")
    anchor: list[float] | None = None
    axis: int | None = Field(None, ge=0, description="anchor on this basis axis of a wide site (transformer); "
                                                    "also the concept's dims when none are given")
    dims: list[int] | None = None


class TermConfig(_Strict):
    kind: str
    weight: str = Field(description="schedule column giving this term's weight")
    concept: str | None = None
    site: str = "latent"
    select: Literal["labelled", "unlabelled", "all"] | None = None
    direction: list[float] | None = None
    dims: list[int] | None = None
    power: float | None = None
    shift: bool | None = None
    eps: float | None = None
    name: str | None = None
    toward: str | None = Field(None, description="residual-toward: the concept whose samples' centre the residual is pulled to")
    positions: str | None = Field(None, description="sequence sites: all | slot:<role> | mellowmax[:ω]")
    head: int | None = Field(None, ge=0, description="sequence sites with per-head output (queries/keys): which head")

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("power", "shift", "eps") if getattr(self, k) is not None}


class TrainConfig(_Strict):
    seeds: int = Field(8, description="number of seeds trained together")
    seed: int = Field(0, description="first seed; seeds are seed … seed+seeds−1")
    steps: int | None = Field(None, description="run length; the schedule is stretched to fit (default: the schedule's own)")
    checkpoint_every: int = Field(500, ge=1)
    snapshot_every: int = Field(100, ge=0, description="latent snapshot interval (0: off)")
    betas: tuple[float, float] = (0.9, 0.999)
    seed_list: list[int] | None = Field(None, description="explicit seed per ensemble member (overrides seed/seeds; repeats allowed)")
    term_masks: list[list[bool]] | None = Field(None, description="per member, which terms are on (for term-subset studies)")
    fast: bool = Field(True, description="use the stacked-matmul path when the model supports it (same numbers, faster)")

    def member_seeds(self) -> list[int]:
        """The seed of every ensemble member, in order."""
        return list(self.seed_list) if self.seed_list is not None else list(range(self.seed, self.seed + self.seeds))

    @model_validator(mode="after")
    def _positive(self) -> "TrainConfig":
        if self.seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {self.seeds}")
        if self.seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {self.seed}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.seed_list is not None and (not self.seed_list or min(self.seed_list) < 0):
            raise ValueError("seed_list must be non-empty seeds ≥ 0")
        if self.term_masks is not None and len(self.term_masks) != len(self.member_seeds()):
            raise ValueError(f"term_masks has {len(self.term_masks)} rows for {len(self.member_seeds())} members")
        return self


class InterventionConfig(_Strict):
    """An edit evaluated at the end of a run: inference-time (suppress, repel, zero) or surgery (ablate, prune)."""

    name: str
    method: Literal["suppress", "repel", "zero", "ablate", "prune"]
    concept: str | None = Field(None, description="direction from this concept's anchor; dims from its anchor's non-zero entries or its dims")
    dims: list[int] | None = None
    falloff: str = Field("constant", description="constant[:s] | linear:a,b | power:a,p,b | bezier:x1,y1,x2,y2,end (repel only)")
    k: float = Field(2.0, gt=0, description="selectivity: R² of error vs similarity^k")
    site: str = "latent"
    sites: list[str] | None = Field(None, description="transformer: anchored sites edited at once (default: all of the concept's)")


class ReactiveConfig(_Strict):
    """Steer a schedule column from a metric (e.g. raise a weight until its loss is below target)."""

    param: str = Field(description="schedule column to steer")
    metric: str = Field(description="metric to watch: loss, recon, or a term's name")
    target: float
    keep: Literal["below", "above"] = "below"
    every: int = Field(100, ge=1, description="decide every N steps, on the median over seeds of the window's mean")
    factor: float = Field(1.5, gt=1.0)
    lowest: float = 0.0
    highest: float = float("inf")
    ease: int = Field(50, ge=1, description="steps each re-targeted transition takes")
    relax: bool = Field(False, description="also lower the parameter when the metric is satisfied")


class EvaluateConfig(_Strict):
    concept: str | None = Field("red", description="anchored concept whose direction is checked")
    min_cosine: float = Field(0.9, description="anchoring criterion: cos(latent of the pure concept colour, anchor)")
    hue_dims: tuple[int, int] = (0, 1)
    hue_order: bool = Field(True, description="require the hues in order around hue_dims for a seed to count as anchored")


class LobeConfig(_Strict):
    name: str
    method: Literal["suppress", "repel"]
    falloff: str


class LanguageConfig(_Strict):
    """The synthetic colour language of the transformer experiments."""

    levels: int = Field(6, ge=2, le=16, description="lattice levels per channel: levels³ colour tokens")
    mix_rule: Literal["exact", "half-up"] = Field("exact", description="'exact': only pairs whose mean lands on the "
                                                                      "lattice; 'half-up': all pairs, rounded half up")
    held_out: float = Field(0.2, ge=0.0, lt=1.0, description="share of unordered mix pairs never trained on")
    split_seed: int = 1234
    op_weights: tuple[float, float, float] = Field((0.5, 0.25, 0.25), description="mix, complement, lighten")
    context: int = Field(64, ge=8, le=1024)
    batch_size: int = Field(16, ge=1, le=4096)


class TransformerConfig(_Strict):
    width: int = Field(64, ge=8)
    layers: int = Field(4, ge=1, le=48)
    heads: int = Field(8, ge=1)
    mlp_ratio: int = Field(2, ge=1, le=8)
    alpha: float = Field(0.2, gt=0, description="initial step size α of every block")
    logit_scale: float = Field(10.0, gt=0)
    control: bool = Field(True, description="also train an unanchored control on the same seeds and batches")
    workers: int = Field(0, ge=0, description="processes training models side by side (0: one per CPU core; 1: in this process)")
    eval_lines: int = Field(2048, ge=64, description="lines per evaluation set")
    reddest: int = Field(10, ge=1, description="'red' equations: answer among the N reddest colours")
    redish: float = Field(0.3, gt=0, le=1, description="an operand or answer with redness ≥ this is 'red-ish'")

    @model_validator(mode="after")
    def _heads(self) -> "TransformerConfig":
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of even size")
        return self


class VariantConfig(_Strict):
    """One arm of a comparison: the same experiment with another schedule."""

    name: str
    schedule: str


class ExperimentConfig(_Strict):
    name: str
    kind: Literal["train", "compare", "combinations", "lobes", "colour-spaces", "transitions", "transformer"] = Field(
        "train", description="'train'; 'compare' (each of `variants` on the same seeds); 'combinations' (every non-empty "
                             "subset of the terms in `combine`, in one ensemble); 'transformer' (colour language, M3); or figure-only: 'lobes', 'colour-spaces', 'transitions'")
    combine: list[str] = Field(default_factory=list, description="term names whose subsets a 'combinations' run trains")
    variants: list[VariantConfig] = Field(default_factory=list)
    lobes: list[LobeConfig] = Field(default_factory=list)
    description: str = ""
    upstream: str | None = Field(None, description="experiment number in the published write-ups")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    concepts: list[ConceptConfig] = Field(default_factory=list)
    terms: list[TermConfig] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    interventions: list[InterventionConfig] = Field(default_factory=list)
    reactive: list[ReactiveConfig] = Field(default_factory=list)
    schedule: str = Field("", description="dopesheet CSV text (a spec file may give a .csv path instead)")

    def to_toml(self) -> str:
        skip = None if self.kind == "transformer" else {"language", "transformer"}  # colour runs stay as they were
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True, exclude=skip), multiline_strings=True)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a resolved config dict; unknown keys are errors."""
    template = ExperimentConfig.model_validate(data).model_dump(mode="python")
    for item in overrides:
        if "=" not in item:
            raise AnchoringError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, shape = data, template
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(shape, list):
                if not part.isdigit() or int(part) >= len(shape):
                    raise AnchoringError(f"unknown --set key {key!r}: {part!r} is not an index below {len(shape)}")
                part_key: Any = int(part)
            elif isinstance(shape, dict) and part in shape:
                part_key = part
            else:
                known = ", ".join(sorted(shape)) if isinstance(shape, dict) else "(none)"
                raise AnchoringError(f"unknown --set key {key!r} (valid keys here: {known})")
            if last:
                node[part_key] = parse_value(raw.strip())
            else:
                if isinstance(node, dict) and part_key not in node:
                    node[part_key] = {}
                node, shape = node[part_key], shape[part_key]
    return data


def _inline_schedule(sched: Any, base: Path) -> Any:
    """A `.csv` path (relative to `base`) becomes the file's text; anything else passes through."""
    if isinstance(sched, str) and "\n" not in sched and sched.strip().endswith(".csv"):
        csv_path = base / sched.strip()
        try:
            return csv_path.read_text()
        except OSError as e:
            raise AnchoringError(f"cannot read schedule {str(csv_path)!r}: {e.strerror}") from None
    return sched if sched is not None else ""


def load_config(path: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a spec or a run's config.toml, inline its schedule, apply overrides, validate."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise AnchoringError(f"cannot read {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise AnchoringError(f"{path.name}: not valid TOML ({e})") from None
    try:
        if overrides:
            data = apply_overrides(data, overrides)
        # a schedule given on the command line is relative to where the user stands
        from_cli = any(o.split("=", 1)[0].strip() == "schedule" for o in overrides or [])
        data["schedule"] = _inline_schedule(data.get("schedule"), Path.cwd() if from_cli else path.parent)
        for variant in data.get("variants", []) if isinstance(data.get("variants"), list) else []:
            if isinstance(variant, dict):
                variant["schedule"] = _inline_schedule(variant.get("schedule"), path.parent)
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise AnchoringError(_one_line(e, path.name)) from None
