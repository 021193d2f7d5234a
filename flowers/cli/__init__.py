"""The `flowers` command line (entry point flowers.cli:main): one module per command family.

options   shared options and defaults (read from the settings dataclasses they fill)
info      flowers info
training  flowers train, flowers evaluate
reports   flowers compare, flowers parity
exports   flowers export, flowers exports list, flowers predict
bench     flowers bench
serving   flowers serve, flowers loadtest, flowers bench-serve
main      the click group built from them; one-line errors and exit statuses
"""

from flowers.cli.main import cli, main

__all__ = ["cli", "main"]
