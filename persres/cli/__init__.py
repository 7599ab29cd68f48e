"""The `persres` command-line interface (Typer + Rich), a thin layer over `persres.api`."""

from persres.cli.app import app, main

__all__ = ["app", "main"]
