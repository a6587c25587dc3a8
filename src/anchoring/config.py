"""Configuration pieces every experiment kind shares, validated at the boundary.

Each kind adds its own sections in `anchoring.kinds.<kind>.config`; `anchoring.experiments`
reads a spec into the right kind (a pydantic union discriminated on `kind`).

A spec on disk may name its schedule as a CSV file next to it; the resolved config carries
the dopesheet text inline, so a run directory's `config.toml` re-runs with nothing else.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import types
import typing
from typing import Any, Literal, Sequence

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from anchoring.runs import SAFE_NAME


def _wants_number(annotation: Any) -> bool:
    """Whether a field holds numbers (int, float, or lists, tuples and optionals of them), and no bools."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return bool not in args and any(_wants_number(a) for a in args if a is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        return any(_wants_number(a) for a in args if a is not Ellipsis)
    return annotation in (int, float)


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(x, bool) for x in value))


NOT_A_BOOL = "expected a number, not true/false"


class _Strict(BaseModel):
    """Unknown keys, non-finite numbers (nan, inf) and true/false for a number are errors at the boundary."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """pydantic reads true as 1 and false as 0: `snapshot_every = true` would quietly mean every step.
        (A model-level check: a field-level one may not touch a discriminated union's `kind`.)"""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if field is not None and _holds_bool(value) and _wants_number(field.annotation):
                    raise ValueError(f"{key}: {NOT_A_BOOL}")
        return data


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

    @model_validator(mode="after")
    def _options_that_give_a_finite_loss(self) -> "TermConfig":
        """Options that can only give NaN, ∞ or a loss of the wrong sign, refused before training."""
        label = f"term {self.name or self.kind!r}"
        if self.power is not None and not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"{label}: power must be a finite number > 0, got {self.power:g}")
        if self.shift is False and self.power is not None and self.power != int(self.power):
            raise ValueError(f"{label}: with shift = false the cosine can be negative, and a negative number to the "
                             f"non-integer power {self.power:g} is NaN; give an integer power or shift = true")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"{label}: eps must be a finite number > 0 (it keeps 1/(d² + eps) finite), got {self.eps:g}")
        return self


SEED_BOUND = 2**32


class TrainConfig(_Strict):
    """What every trained kind shares; kinds add their own fields in a subclass."""

    seeds: int = Field(8, description="number of seeds trained together")
    seed: int = Field(0, description="first seed; seeds are seed … seed+seeds−1")
    steps: int | None = Field(None, description="run length; the schedule is stretched to fit (default: the schedule's own)")
    checkpoint_every: int = Field(500, ge=1)
    betas: tuple[float, float] = (0.9, 0.999)
    seed_list: list[int] | None = Field(None, description="explicit seed per ensemble member (overrides seed/seeds; repeats allowed)")

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
        # torch seeds generators with 64-bit integers, and kinds derive further seeds from these:
        # a bound well inside that range, so that a huge seed fails here and not after the run is made
        highest = max(self.seed_list) if self.seed_list is not None else self.seed + self.seeds - 1
        if highest >= SEED_BOUND:
            raise ValueError(f"seeds must be below 2**32 = {SEED_BOUND}, got up to {highest}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class InterventionConfig(_Strict):
    """An edit evaluated at the end of a run: inference-time (suppress, repel, zero) or surgery (ablate, prune;
    blind: an LM's readers after the anchored site)."""

    name: str
    method: Literal["suppress", "repel", "zero", "ablate", "prune", "blind"]
    concept: str | None = Field(None, description="direction from this concept's anchor; dims from its anchor's non-zero entries or its dims")
    dims: list[int] | None = None
    falloff: str = Field("constant", description="constant[:s] | linear:a,b | power:a,p,b | bezier:x1,y1,x2,y2,end (repel only)")
    k: float = Field(2.0, gt=0, description="selectivity: R² of error vs similarity^k")
    site: str = "latent"
    sites: list[str] | None = Field(None, description="transformer: anchored sites edited at once (default: all of the concept's)")


class LobeConfig(_Strict):
    name: str
    method: Literal["suppress", "repel"]
    falloff: str


class VariantConfig(_Strict):
    """One arm of a comparison: the same experiment with another schedule."""

    name: str
    schedule: str


class ExperimentBase(_Strict):
    """Fields every experiment kind has; each kind's config subclasses this (or `TrainedExperiment`)."""

    name: str
    kind: str
    description: str = ""
    upstream: str | None = Field(None, description="experiment number in the published write-ups")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        """The name becomes a folder, `runs/<name>/<time>`: no separators, no `..`, not empty (a compare
        study's variant names are checked by the study, which names the experiment)."""
        if not SAFE_NAME.match(v):
            raise ValueError(f"experiment name {v!r} names the run's folder: use letters, digits and _ . , + = - "
                             f"(starting with a letter or digit)")
        return v

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True), multiline_strings=True)


class TrainedExperiment(ExperimentBase):
    """An experiment that trains models: concepts, regularizer terms, a schedule, edits."""

    concepts: list[ConceptConfig] = Field(default_factory=list)
    terms: list[TermConfig] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)
    interventions: list[InterventionConfig] = Field(default_factory=list)
    schedule: str = Field("", description="dopesheet CSV text (a spec file may give a .csv path instead)")


def _known_keys(model: type[BaseModel] | None, path: Sequence[str]) -> list[str]:
    """The keys a config section accepts, found by walking `path` down from `model` (list indices
    and optional or union types are looked through); empty where the walk cannot tell."""
    for part in path:
        if model is None or part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = next(iter(_models_in(field.annotation)), None)
    return list(model.model_fields) if model is not None else []


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def one_line(err: ValidationError, source: str, kind: str | None = None, overridden: Sequence[str] = (),
             model: type[BaseModel] | None = None) -> str:
    """The first validation error as one line; an unknown key names the experiment's kind. A value
    that came from `--set` (a key of `overridden`, or under one) is blamed on --set, not on the file."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix to a validator's own sentence
    if msg.endswith(": " + NOT_A_BOOL):  # a model-level check that names its field: the field joins the path
        field, msg = msg.split(": ", 1)
        loc.append(field)
    if kind is not None and loc and loc[0] == kind:  # discriminated unions prefix the kind's tag
        loc = loc[1:]
    where = ".".join(loc) or "config"
    keys = {".".join(str(int(p)) if p.strip().isdigit() else p.strip() for p in k.split(".")) for k in overridden}
    if any(where == k or where.startswith(k + ".") for k in keys):
        source = "--set"
    elif keys and (not loc or any(k.startswith(where + ".") for k in keys)):
        # a check across keys (a section's or the whole config's): the file and the --set items under it together
        under = sorted(k for k in keys if not loc or k.startswith(where + "."))
        source = f"{source} with --set {', '.join(under)}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _known_keys(model, loc[:-1]), n=1) if model is not None and loc else []
        hint = f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)" if close else ""
        return f"{source}: {where}: key means nothing for a {kind!r} experiment{hint}{more}"
    return f"{source}: {where}: {msg}{more}"


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


