"""Built-in experiments (TOML specs with dopesheet CSVs, shipped as package data) and reading
any spec or run config into its kind's validated config."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchoring.config import ExperimentBase
from anchoring.domains.text.corpus import BUILTIN
from anchoring.errors import AnchoringError
from anchoring.kinds import apply_overrides, validate_config

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
    for p in sorted(HERE.glob("*.toml"), key=lambda p: p.stem):  # by name: `lm-anchor` before `lm-anchor-cleared`
        d = tomllib.loads(p.read_text())
        specs[d["name"]] = Spec(d["name"], d.get("upstream"), d.get("description", ""), p)
    return specs


def find(name_or_path: str) -> Path:
    """A built-in name, its `ex-<upstream>` alias, or a path to a TOML file or run directory."""
    specs = builtin()
    if name_or_path in specs:
        return specs[name_or_path].path
    aliased = [s for s in specs.values() if s.upstream and name_or_path == f"ex-{s.upstream}"]
    if len(aliased) > 1:  # `ex-M4` opened whichever came first by name
        raise AnchoringError(f"{name_or_path!r} names {len(aliased)} experiments ({', '.join(s.name for s in aliased)}); "
                             f"give the name")
    if aliased:
        return aliased[0].path
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_dir():
        if p.is_dir():
            p = p / "config.toml"
        if not p.is_file():
            raise AnchoringError(f"no config file at {str(p)!r}")
        return p
    raise AnchoringError(f"unknown experiment {name_or_path!r} (see `anchoring list`: {', '.join(specs)})")


def _inline_schedule(sched: Any, base: Path) -> Any:
    """A `.csv` path (relative to `base`) becomes the file's text; anything else passes through.

    A bare file name that is not under `base` but is one of the shipped schedules (next to the
    built-in specs) is that one, so `--set schedule=lm-spans-light.csv` works from any directory."""
    if isinstance(sched, str) and "\n" not in sched and sched.strip().endswith(".csv"):
        csv_path = base / sched.strip()
        shipped = HERE / sched.strip()
        if not csv_path.exists() and Path(sched.strip()).name == sched.strip() and shipped.is_file():
            csv_path = shipped
        try:
            return csv_path.read_text()
        except OSError as e:
            raise AnchoringError(f"cannot read schedule {str(csv_path)!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise AnchoringError(f"schedule {str(csv_path)!r} is not UTF-8 text") from None
    return sched


def load_config(path: Path, overrides: list[str] | None = None) -> ExperimentBase:
    """Read a spec or a run's config.toml, inline its schedule, apply overrides, validate."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no TOML error
    except OSError as e:
        raise AnchoringError(f"cannot read {str(path)!r}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AnchoringError(f"{path.name}: not valid TOML ({e})") from None
    if overrides:
        data = apply_overrides(data, overrides, path.name)
    # a path given on the command line is relative to where the user stands, one in the file to the file's folder
    set_keys = [o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o]

    def base(key: str) -> Path:
        return Path.cwd() if any(k == key or key.startswith(k + ".") for k in set_keys) else path.parent

    if "schedule" in data:
        data["schedule"] = _inline_schedule(data.get("schedule"), base("schedule"))
    for i, variant in enumerate(data.get("variants", []) if isinstance(data.get("variants"), list) else []):
        if isinstance(variant, dict):
            variant["schedule"] = _inline_schedule(variant.get("schedule"), base(f"variants.{i}.schedule"))
    text = data.get("text")
    if isinstance(text, dict) and isinstance(text.get("corpus"), str) and text["corpus"].strip() not in BUILTIN:
        corpus = Path(text["corpus"]).expanduser()
        if not corpus.is_absolute():
            text["corpus"] = str(base("text.corpus") / corpus)
    return validate_config(data, path.name, set_keys)


def load(name_or_path: str, overrides: list[str] | None = None) -> ExperimentBase:
    return load_config(find(name_or_path), overrides)
