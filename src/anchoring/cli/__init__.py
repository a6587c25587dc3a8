"""`anchoring` command: parse, call the lifecycle or a kind, print what the kind says to print.

Every user mistake ends as one line `error: …` on stderr with exit code 2, and nothing written.
The commands live in one module per group (`running`, `show`, `edit`, `sweeping`, `bench`, `text`);
importing them registers them on the one typer app, in the order `--help` lists them.
"""

from __future__ import annotations

import importlib

from anchoring.cli import common
from anchoring.cli.common import app, err
from anchoring.runtime import default_threads

for _group in ("running", "show", "edit", "sweeping", "bench", "text"):  # registers the commands, in --help's order
    importlib.import_module(f"anchoring.cli.{_group}")


def main(argv: list[str] | None = None) -> None:
    common.stop_said = False
    default_threads()
    try:
        app(args=argv)
    except SystemExit as e:
        if e.code == 130 and not common.stop_said:  # stopped outside every command's own handler (loading a run, say)
            err.print("interrupted", markup=False, highlight=False)
        raise
    except OSError as e:  # a full disk, a file vanished under a run: the system's reason, in one line
        where = f": {e.filename}" if e.filename else ""
        err.print(f"error: {e.strerror or e}{where}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
