"""`persres ui`: serve the local web app on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from persres.cli.root import Command, ConfigOption, ModelOption, app, command, err, workspace


@app.command(cls=Command)
@command
def ui(
    host: Annotated[str, typer.Option(help="Address to serve on; another than loopback needs --auth.", metavar="HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", metavar="INTEGER")] = 7860,
    model: ModelOption = None,
    model_config: ConfigOption = None,
    auth: Annotated[Optional[str], typer.Option(help="USER:PASS the page asks for (needed beyond loopback).", metavar="USER:PASS")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where generated images and exports go [default: HOME/ui].",
                                                    metavar="DIR")] = None,
):
    """Serve the web app: browse, train and compose concepts, with each concept's region in view."""
    from persres.errors import InputError
    from persres.images import check_writable_dir
    from persres.ui.address import check_serving

    check_serving(host, port, auth)  # port, host and exposure before any model is touched
    if out_dir is not None:
        check_writable_dir(out_dir)
    try:
        from persres.ui.app import serve
    except ImportError:
        raise InputError("the web app needs Gradio: pip install 'persres[ui]'") from None
    ws = workspace(model, model_config)
    out = out_dir or ws.registry.home / "ui"
    err.print(f"persres ui on http://{host}:{port} (model {ws.model}); Ctrl-C stops it", markup=False)
    serve(ws, out, host, port, auth, block=True)
