"""The `persres` command-line interface (Typer + Rich), a thin layer over `persres.api`."""

from persres.cli import scale as _scale  # noqa: F401  (registers train-many)
from persres.cli import suggest as _suggest  # noqa: F401  (registers suggest-class)
from persres.cli.app import app, main

__all__ = ["app", "main"]
