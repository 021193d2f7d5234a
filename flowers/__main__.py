"""`python -m flowers ...` is `flowers ...` (torchrun runs modules: torchrun ... -m flowers train ...)."""

from flowers.cli import main

main()
