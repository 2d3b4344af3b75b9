"""`python -m service.cli` is the `stackml` command."""

from service.cli import main

main()
