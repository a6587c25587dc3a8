"""Entry point of one benchmark case in its own process: prints one JSON line."""

from __future__ import annotations

import json
import sys

from anchoring.benchmarks import cases
from anchoring.runtime import default_threads


def main(argv: list[str]) -> None:
    default_threads()  # the same thread setting as `anchoring run`, so cases compare like with like
    kind, *args = argv
    if kind == "eager":
        res = cases.eager_baseline(int(args[0]))
    elif kind == "ensemble":
        res = cases.ensemble(int(args[0]), int(args[1]), fast=args[2] == "fast")
    elif kind == "text":
        res = cases.text_pipeline()
    elif kind == "surprise":
        res = cases.surprise_page()
    elif kind == "lm":
        from anchoring.benchmarks.lm import lm_step

        flags = {"compiled", "cuda"}
        res = lm_step(args[0], int(args[1]), *(int(a) for a in args[2:] if a not in flags), compiled="compiled" in args,
                      device="cuda" if "cuda" in args else "cpu")
    else:
        raise SystemExit(f"unknown benchmark case {kind!r}")
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
