"""`python -m persres ...`: the same command as `persres ...` (used by torchrun and the tests)."""

from persres.cli import main

main()
