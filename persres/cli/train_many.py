"""`persres train-many`: the CLI over `persres.train_many`, on one process or under accelerate/torchrun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from persres.cli.root import Command, ConfigOption, app, command, err, out, quiet_loading, registry


@app.command("train-many", cls=Command)
@command
def train_many_command(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", help="CSV (header row) or JSONL: images, name, class [, steps, lr, rank_ratio, seed, model].")],
    model: Annotated[Optional[str], typer.Option("--model", help="Base model for rows without their own [default: the configured model].",
                                                 metavar="MODEL")] = None,
    model_config: ConfigOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (under accelerate: each process's own GPU).", metavar="DEVICE")] = "auto",
    out_dir: Annotated[Path, typer.Option("--out", help="Where --shards puts pack files before rank 0 registers them.", metavar="DIR")] = Path("train-many-out"),
    shards: Annotated[Optional[bool], typer.Option("--shards/--no-shards",
                                                   help="Processes write packs into OUT/shards and rank 0 registers them [default: on across machines].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list of row results on stdout.")] = False,
):
    """Train many concepts from a manifest; rows already registered with the same config are skipped."""
    from rich.table import Column, Table

    from persres.manifest import read_manifest
    from persres.scale import cluster
    from persres.train_many import train_many
    from persres.workspace import Workspace

    rows = read_manifest(manifest)
    quiet_loading()
    with cluster(device) as here:
        sharded = here.multi_node if shards is None else shards
        reg = registry() if here.main or not sharded else None  # across machines only rank 0 opens SQLite
        if here.main:
            Workspace(model, registry=reg, model_config=model_config)  # a bad --model is one line before any work
        results = train_many(rows, model=model, model_config=model_config, registry=reg, shards=out_dir / "shards" if sharded else None,
                             cluster=here, log=lambda m: err.print(m, markup=False) if not as_json else None)
        failed = [r for r in results if r.status == "failed"]
        if here.main:
            if as_json:
                print(json.dumps([r.to_dict() for r in results], indent=2))
            else:
                table = Table("name", "status", "seconds", "loss", "identifier", "rank", Column("note", overflow="fold"),
                              title=f"train-many: {len(results) - len(failed)} of {len(results)} rows done")
                for r in results:
                    style = {"failed": "red", "skipped": "dim"}.get(r.status, "")
                    table.add_row(r.name, f"[{style}]{r.status}[/]" if style else r.status, f"{r.seconds:.1f}",
                                  "" if r.loss is None else f"{r.loss:.4f}", r.identifier, str(r.rank), r.message)
                out.print(table)
    if failed:
        raise typer.Exit(1)
