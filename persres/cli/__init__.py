"""The `persres` command-line interface (Typer + Rich), a thin layer over `persres.Workspace`."""

from persres.cli import bench, concepts, gen, train, train_many  # noqa: F401  (each registers its commands)
from persres.cli.app import app, main

__all__ = ["app", "main"]
