"""`python -m anchoring.cli …` is the `anchoring` command too, as it was before the CLI became a package."""

from anchoring.entry import main

main()
