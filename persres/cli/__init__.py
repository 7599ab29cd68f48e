"""The `persres` command-line interface (Typer + Rich), a thin layer over `persres.Workspace`.

A command's module is imported only when that command runs: `persres list` loads the registry
commands alone, not the training and generation options (and their imports). Help, an unknown
command and `from persres.cli import app` (as tests use it) load every module.
"""

from __future__ import annotations

import importlib
import sys

# Each module registers its commands on the app.
MODULES = ("train", "gen", "concepts", "train_many", "bench", "ui", "comfyui")
# The module that registers each top-level command, in the order help lists them
# (tests/test_startup.py checks it against the app).
COMMAND_MODULES = {
    "train": "train", "suggest-class": "train",
    "gen": "gen", "eval": "gen",
    "list": "concepts", "show": "concepts", "rm": "concepts", "export": "concepts", "import": "concepts",
    "doctor": "concepts",
    "train-many": "train_many",
    "ui": "ui",
    "config": "concepts",
    "bench": "bench",
    "comfyui": "comfyui",
}


def load(modules=MODULES):
    """Import command modules (each registers its commands on the app) and return the app."""
    for name in modules:
        importlib.import_module(f"persres.cli.{name}")
    from persres.cli.root import app

    return app


def command_name(argv: list[str]) -> str | None:
    """The command `argv` runs: its first word that is not an option (`persres --version` runs none)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main() -> None:
    name = command_name(sys.argv[1:])
    app = load((COMMAND_MODULES[name],) if name in COMMAND_MODULES else MODULES)
    app(prog_name="persres")


def __getattr__(attribute: str):
    if attribute == "app":  # `from persres.cli import app`: the whole CLI
        return load()
    raise AttributeError(f"module 'persres.cli' has no attribute {attribute!r}")


__all__ = ["app", "main"]
