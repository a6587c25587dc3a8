"""`python -m anchoring …` is the `anchoring` command."""

from anchoring.cli import main

main()
