"""`python -m sspry` runs the `sspry` command."""

from sspry.cli import main

main()
