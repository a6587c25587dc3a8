"""`python -m anchoring.benchmarks [options]` is `anchoring bench [options]`."""

import sys

from anchoring.cli import main

main(["bench", *sys.argv[1:]])
