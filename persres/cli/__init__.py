"""The `persres` command-line interface (Typer + Rich), a thin layer over `persres.Workspace`."""

from persres.cli import train, gen, concepts, train_many, bench, ui  # noqa: F401, I001  (each registers its commands, in the order help lists them)
from persres.cli.app import app, main

__all__ = ["app", "main"]
