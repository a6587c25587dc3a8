"""Dopesheet CSV ⇄ Timeline (format in method.md §2 'Schedules').

STEP, optional PHASE and ACTION columns, then one column per hyperparameter with header
`name[:linear|log[:minjerk|linear|step]]`. STEP is absolute (`750`) or relative to the
surrounding absolute rows: `+N` after the previous one, `-N` before the next one, `+0.25`
a fraction of the way between them. An empty cell keys nothing.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from anchoring.errors import AnchoringError
from anchoring.schedule.timeline import Timeline
from anchoring.schedule.track import INTERPS, SPACES, Track

_ABS = re.compile(r"^\d+$")
_REL = re.compile(r"^[+-]\d+$")
_FRAC = re.compile(r"^\+(\d*\.\d+|\d+\.\d*)$")
RESERVED = ("STEP", "PHASE", "ACTION")


def _parse_header(cells: list[str], source: str = "dopesheet") -> tuple[dict[str, int], list[tuple[str, str, str, int]]]:
    if not cells or cells[0].strip().upper() != "STEP":
        raise AnchoringError(f"{source}: first column must be STEP")
    special: dict[str, int] = {}
    params: list[tuple[str, str, str, int]] = []
    seen: set[str] = set()
    for i, raw in enumerate(cells):
        cell = raw.strip()
        if cell.upper() in RESERVED:
            special[cell.upper()] = i
            continue
        parts = cell.split(":")
        name = parts[0].strip()
        if not name or len(parts) > 3:
            raise AnchoringError(f"{source}: bad column header {cell!r} (want name[:space[:interp]])")
        space = parts[1].strip() if len(parts) > 1 else "linear"
        interp = parts[2].strip() if len(parts) > 2 else "minjerk"
        if space not in SPACES:
            raise AnchoringError(f"{source} column {name!r}: unknown space {space!r} (use {'|'.join(SPACES)})")
        if interp not in INTERPS:
            raise AnchoringError(f"{source} column {name!r}: unknown interpolation {interp!r} (use {'|'.join(INTERPS)})")
        if name in seen:
            raise AnchoringError(f"{source}: column {name!r} appears twice")
        seen.add(name)
        params.append((name, space, interp, i))
    return special, params


def _resolve_steps(raw: list[tuple[int, str]], source: str = "dopesheet") -> list[int]:
    """Absolute step for every row; `raw` holds (line number, STEP cell). Errors name `source` as the
    other dopesheet errors do, so a user with several schedule files knows which one to fix."""
    absolute: list[int | None] = []
    for line, cell in raw:
        if _ABS.match(cell):
            absolute.append(int(cell))
        elif _REL.match(cell) or _FRAC.match(cell):
            absolute.append(None)
        else:
            raise AnchoringError(f"{source} line {line}: bad STEP {cell!r} (use 750, +10, -10 or +0.5)")
    steps: list[int] = []
    for k, ((line, cell), fixed) in enumerate(zip(raw, absolute)):
        if fixed is not None:
            steps.append(fixed)
            continue
        prev = next((a for a in reversed(absolute[:k]) if a is not None), 0)
        nxt = next((a for a in absolute[k + 1 :] if a is not None), None)
        if _FRAC.match(cell) or cell.startswith("-"):
            if nxt is None:
                raise AnchoringError(f"{source} line {line}: STEP {cell!r} needs a later absolute row")
            if _FRAC.match(cell) and not 0 <= float(cell) <= 1:
                raise AnchoringError(f"{source} line {line}: STEP {cell!r} is a fraction of the way to the next "
                                     f"absolute row, so it must lie between +0.0 and +1.0")
            step = round(prev + float(cell) * (nxt - prev)) if _FRAC.match(cell) else nxt + int(cell)
        else:
            step = prev + int(cell)
        steps.append(step)
    for (line, cell), s, before in zip(raw[1:], steps[1:], steps):
        if s < before:
            raise AnchoringError(f"{source} line {line}: STEP {cell!r} resolves to {s}, before the previous row's {before}")
    if steps and steps[0] < 0:
        raise AnchoringError(f"{source} line {raw[0][0]}: STEP resolves to {steps[0]} < 0")
    return steps


def dopesheet_rows(text: str, source: str = "dopesheet") -> list[tuple[int, list[str]]]:
    """The rows that count, with their line numbers: blank lines and `#` comments go, and so does a
    byte-order mark (a spreadsheet's "CSV UTF-8" starts with one)."""
    text = text.removeprefix("\ufeff")
    try:
        return [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text)), start=1)
                if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    except csv.Error as e:
        raise AnchoringError(f"{source}: not valid CSV ({e})") from None


def parse_dopesheet(text: str, source: str = "dopesheet") -> Timeline:
    """Parse dopesheet CSV text; every error names the line and column at fault."""
    rows = dopesheet_rows(text, source)
    if not rows:
        raise AnchoringError(f"{source}: empty dopesheet")
    special, params = _parse_header(rows[0][1], source)
    if not params:
        raise AnchoringError(f"{source}: no hyperparameter columns")
    body = rows[1:]
    if not body:
        raise AnchoringError(f"{source}: no rows after the header")
    width = len(rows[0][1])
    for line, cells in body:
        if len(cells) != width:
            raise AnchoringError(f"{source} line {line}: {len(cells)} cells but the header has {width} "
                                 f"(leave a cell empty with nothing between its commas)")
    cell = lambda cells, i: cells[i].strip() if i < len(cells) else ""  # noqa: E731
    steps = _resolve_steps([(line, cell(cells, 0)) for line, cells in body], source)

    tracks: dict[str, Track] = {}
    for name, space, interp, col in params:
        keys: dict[int, float] = {}
        for (line, cells), step in zip(body, steps):
            text_value = cell(cells, col)
            if not text_value:
                continue
            try:
                value = float(text_value)
            except ValueError:
                raise AnchoringError(f"{source} line {line}, column {name!r}: {text_value!r} is not a number") from None
            if not math.isfinite(value):
                raise AnchoringError(f"{source} line {line}, column {name!r}: {text_value!r} is not a finite number")
            if step in keys:
                raise AnchoringError(f"{source} line {line}, column {name!r}: step {step} is keyed twice")
            if space == "log" and value <= 0:
                raise AnchoringError(f"{source} line {line}, column {name!r}: log-space values must be > 0, got {text_value}")
            keys[step] = value
        if not keys:
            raise AnchoringError(f"{source}: column {name!r} has no values")
        tracks[name] = Track(keys.items(), space, interp, name)  # type: ignore[arg-type]

    phases = [(s, cell(c, special["PHASE"])) for (_, c), s in zip(body, steps)
              if "PHASE" in special and cell(c, special["PHASE"])]
    actions: dict[int, list[str]] = {}
    if "ACTION" in special:
        for (_, c), s in zip(body, steps):
            for a in cell(c, special["ACTION"]).split(","):
                if a.strip():
                    actions.setdefault(s, []).append(a.strip())
    return Timeline(tracks, steps[-1] + 1, phases, actions)


def read_dopesheet(path: str | Path) -> Timeline:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise AnchoringError(f"cannot read dopesheet {str(p)!r}: {e.strerror}") from None
    return parse_dopesheet(text, source=p.name)
