"""``python -m cmpnas.cli``."""

from cmpnas.cli.app import main

main()
