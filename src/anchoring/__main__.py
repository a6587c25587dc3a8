"""`python -m anchoring …` is the `anchoring` command."""

from anchoring.entry import main

main()
