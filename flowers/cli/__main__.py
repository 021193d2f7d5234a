"""`python -m flowers.cli`: the flowers command (what the tests run in subprocesses)."""

from flowers.cli.main import main

main()
