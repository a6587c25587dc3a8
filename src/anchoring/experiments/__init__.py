"""Built-in experiments: TOML specs (with dopesheet CSVs) shipped as package data."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from anchoring.config import ExperimentConfig, load_config
from anchoring.errors import AnchoringError

HERE = Path(__file__).parent
DEFAULT = "anchored"


@dataclass(frozen=True)
class Spec:
    name: str
    upstream: str | None
    description: str
    path: Path


def builtin() -> dict[str, Spec]:
    specs = {}
    for p in sorted(HERE.glob("*.toml")):
        d = tomllib.loads(p.read_text())
        specs[d["name"]] = Spec(d["name"], d.get("upstream"), d.get("description", ""), p)
    return specs


def find(name_or_path: str) -> Path:
    """A built-in name, its `ex-<upstream>` alias, or a path to a TOML file."""
    specs = builtin()
    if name_or_path in specs:
        return specs[name_or_path].path
    for s in specs.values():
        if s.upstream and name_or_path == f"ex-{s.upstream}":
            return s.path
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_dir():
        if p.is_dir():
            p = p / "config.toml"
        if not p.is_file():
            raise AnchoringError(f"no config file at {str(p)!r}")
        return p
    raise AnchoringError(f"unknown experiment {name_or_path!r} (see `anchoring list`: {', '.join(specs)})")


def load(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(find(name_or_path), overrides)
