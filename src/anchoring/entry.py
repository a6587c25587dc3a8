"""The `anchoring` command's entry point.

Loading the command line (torch, matplotlib, …) takes seconds. A Ctrl-C in that time ends in one
line and exit code 130, as it does later, instead of a traceback through the import machinery.
"""

import sys


def main() -> None:
    try:
        from anchoring.cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was done\n")
        raise SystemExit(130) from None
    command()
