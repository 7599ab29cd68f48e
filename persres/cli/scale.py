"""`persres train-many`: the CLI over `persres.manifest`, on one process or under accelerate/torchrun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Column, Table

from persres.cli.app import _model, _registry, app, command, err, out


@app.command("train-many")
@command
def train_many_command(
    manifest: Path = typer.Argument(..., help="CSV (header row) or JSONL: images, name, class [, steps, lr, rank_ratio, seed, model]."),
    model: Optional[str] = typer.Option(None, help="Base model for rows without their own [default: the configured model]."),
    model_config: Optional[str] = typer.Option(None, "--config", help="Diffusers directory with the configs of a single-file model."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (under accelerate: each process's own GPU)."),
    out_dir: Path = typer.Option(Path("train-many-out"), "--out", help="Where --shards puts pack files before rank 0 registers them."),
    shards: Optional[bool] = typer.Option(None, "--shards/--no-shards",
                                          help="Processes write packs into OUT/shards and rank 0 registers them [default: on across machines]."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list of row results on stdout."),
):
    """Train many concepts from a manifest; rows already registered with the same config are skipped."""
    from persres.manifest import read_manifest, train_many
    from persres.scale import cluster

    rows = read_manifest(manifest)
    with cluster(device) as here:
        sharded = here.multi_node if shards is None else shards
        registry = _registry() if here.main or not sharded else None  # across machines only rank 0 opens SQLite
        if here.main:
            _model(registry, model, model_config)  # a bad --model is one line before any work
        results = train_many(rows, model=model, model_config=model_config, registry=registry,
                             shards=out_dir / "shards" if sharded else None, cluster=here,
                             log=lambda m: err.print(m, markup=False) if not as_json else None)
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
