"""`persres comfyui install`: persres's nodes in a ComfyUI installation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from persres.cli.root import Command, app, command, out

comfyui_app = typer.Typer(help="persres's ComfyUI nodes: LAG regions inside ComfyUI's own sampler.", no_args_is_help=True,
                          rich_markup_mode=None)
app.add_typer(comfyui_app, name="comfyui")


@comfyui_app.command("install", cls=Command)
@command
def comfyui_install(
    path: Annotated[Optional[str], typer.Argument(metavar="COMFYUI_DIR", help="ComfyUI's folder [default: $COMFYUI_PATH].")] = None,
):
    """Put persres's nodes (PersresConcepts, PersresRegions) and their example workflows in ComfyUI's custom_nodes."""
    from persres.comfyui.install import install

    target = install(path)
    out.print(f"installed {target} (restart ComfyUI; the nodes are under 'persres', examples in example_workflows/)",
              markup=False, highlight=False)
