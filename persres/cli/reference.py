"""docs/cli.md, generated from the Typer app itself: every command's `--help`, so the reference
cannot drift from the CLI (tests/test_docs.py fails when the committed page differs).

    python -m persres.cli.reference > docs/cli.md
"""

from __future__ import annotations

import typer

from persres.cli import app

WIDTH = 100


def _commands(command, path: list[str], parent=None):
    """(path, command, its context) for the command and everything under it, in help's order."""
    ctx = command.context_class(command, info_name=path[-1], parent=parent, terminal_width=WIDTH, max_content_width=WIDTH)
    yield path, command, ctx
    if hasattr(command, "list_commands"):  # a group (Typer vendors click: no isinstance on click's classes)
        for name in command.list_commands(ctx):
            yield from _commands(command.get_command(ctx, name), [*path, name], ctx)


def markdown() -> str:
    root = typer.main.get_command(app)
    lines = ["# CLI reference", "",
             "Generated from the app (`python -m persres.cli.reference > docs/cli.md`): each command's `--help`.",
             "Every bad input is one `error:` line on stderr and exit code 1.", ""]
    for path, command, ctx in _commands(root, ["persres"]):
        title = " ".join(path)
        lines += [f"## `{title}`", "", "```text", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
