"""`python -m cityseg ...` is `cityseg-fast ...` (torchrun launches it this way)."""

from cityseg.cli import main

main()
