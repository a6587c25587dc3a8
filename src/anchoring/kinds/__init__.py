"""The experiment kinds, as sibling packages, and the one registry that maps a config's `kind`
to its implementation. Nothing else in the project dispatches on `kind`."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Annotated, Any, Sequence, Union

from pydantic import Field, TypeAdapter, ValidationError

from anchoring import runs
from anchoring.config import ExperimentBase, one_line, parse_value
from anchoring.errors import AnchoringError
from anchoring.kinds.base import Kind
from anchoring.kinds.colour import KIND as COLOUR
from anchoring.kinds.figures import KIND as FIGURES
from anchoring.kinds.lm import KIND as LM
from anchoring.kinds.transformer import KIND as TRANSFORMER

REGISTRY: dict[str, Kind] = {k.name: k for k in (COLOUR, TRANSFORMER, FIGURES, LM)}

_ADAPTER = TypeAdapter(Annotated[Union[tuple(k.config for k in REGISTRY.values())], Field(discriminator="kind")])  # type: ignore[misc]

# kind names written by earlier versions, so old run directories still open
_LEGACY = {"train": {"kind": "colour"}, "compare": {"kind": "colour", "study": "compare"},
           "combinations": {"kind": "colour", "study": "combinations"},
           "lobes": {"kind": "figures", "figures": "lobes"}, "colour-spaces": {"kind": "figures", "figures": "colour-spaces"},
           "transitions": {"kind": "figures", "figures": "transitions"}}


def kind_of(cfg: ExperimentBase) -> Kind:
    return REGISTRY[cfg.kind]


def kind_name(value: Any) -> str:
    """The kind that a `kind` value written by any version means: an earlier version's name (`train`,
    `compare`, …) as today's kind, none as colour (the only kind there was)."""
    if value is None:
        return "colour"
    if isinstance(value, str):
        return _LEGACY[value]["kind"] if value in _LEGACY else value
    return repr(value)


def kind_of_run(run_dir: Path) -> Kind:
    """The kind of the run in `run_dir`, from its config's `kind` alone (no validation: a folder an
    edit wrote inside the run is read by that kind, whatever else the config says)."""
    try:
        name = kind_name(tomllib.loads((run_dir / runs.CONFIG).read_text()).get("kind"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise AnchoringError(f"{str(run_dir / runs.CONFIG)!r} cannot be read ({e})") from None
    if name not in REGISTRY:
        raise AnchoringError(f"{str(run_dir)!r} is a run of an unknown kind {name!r} (kinds: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    kind = data.get("kind", "colour")
    if isinstance(kind, str) and kind in _LEGACY:
        data = {**data, **_LEGACY[kind]}
    data.setdefault("kind", "colour")
    return data


def validate_config(data: dict[str, Any], source: str, overridden: Sequence[str] = ()) -> ExperimentBase:
    """A config dict as its kind's pydantic model; every problem is one line naming the key (and
    `--set`, when the bad value is one of the `overridden` keys)."""
    data = _upgrade(data)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise AnchoringError(f"{source}: kind: unknown kind {kind!r} (kinds: {', '.join(REGISTRY)})")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise AnchoringError(one_line(e, source, kind, overridden, REGISTRY[kind].config)) from None


def _mended(data: dict[str, Any], overrides: list[str], source: str) -> ExperimentBase:
    """The file's config with the overrides written straight into it, to learn the shape that the
    overrides are then checked against; the file's own error when that does not validate either."""
    mended = copy.deepcopy(data)
    try:
        for item in overrides:
            key, raw = item.split("=", 1)
            *path, last = key.strip().split(".")
            node: Any = mended
            for part in path:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            node[int(last) if isinstance(node, list) else last] = parse_value(raw.strip())
        return validate_config(mended, source)
    except (AnchoringError, ValueError, LookupError, TypeError, AttributeError):
        return validate_config(data, source)  # raises the file's error


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a config dict; a key the experiment's kind does not
    have is an error naming the key and the kind."""
    data = _upgrade(data)
    try:
        cfg = validate_config(data, source)
    except AnchoringError:  # a bad value in the file that an override replaces is no reason to refuse
        cfg = _mended(data, overrides, source)
    template = cfg.model_dump(mode="python")
    for item in overrides:
        if "=" not in item:
            raise AnchoringError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, shape = data, template
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if (shape is None or isinstance(shape, tuple)) and i > 0:  # a fixed-length or unset value: no parts to set
                whole = ".".join(parts[:i])
                why, like = ("is not set", "…") if shape is None else (f"has a fixed length of {len(shape)}", "[…]")
                raise AnchoringError(f"--set {key!r}: {whole} {why}; give the whole value, as in --set {whole}={like}")
            if isinstance(shape, list):
                if not part.isdigit() or int(part) >= len(shape):
                    raise AnchoringError(f"unknown --set key {key!r}: {part!r} is not an index below {len(shape)}")
                part_key: Any = int(part)
            elif isinstance(shape, dict) and part in shape:
                part_key = part
            else:
                known = ", ".join(sorted(shape)) if isinstance(shape, dict) else "(none)"
                raise AnchoringError(f"unknown --set key {key!r} for a {cfg.kind!r} experiment (valid keys here: {known})")
            if last:
                node[part_key] = parse_value(raw.strip())  # true for a number: refused by the config models
            else:
                if isinstance(node, dict) and part_key not in node:
                    # a section the spec does not write: start from its default, so that an index into a
                    # default list (unlearning.relearn_k.0) edits that list instead of an empty dict
                    node[part_key] = copy.deepcopy(shape[part_key]) if isinstance(shape[part_key], list) else {}
                node, shape = node[part_key], shape[part_key]
    return data


__all__ = ["REGISTRY", "Kind", "apply_overrides", "kind_name", "kind_of", "validate_config"]
