"""The registry commands: list, show, rm, export, import, doctor, config model. None imports torch
but `import` of a foreign LoRA and `export` to a LoRA format, which need the model or tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from persres.names import layer_kinds
from persres.cli.root import Command, ConfigOption, JsonOption, ModelOption, app, command, config_app, out, registry, workspace


MISSING = "pack file missing: run persres doctor"


@app.command("list", cls=Command)
@command
def list_(as_json: JsonOption = False):
    """List registered concepts."""
    records, damaged = registry().scan()
    missing = {r.name for r in records if not r.path.is_file()}  # a row whose pack file is gone: said, not hidden
    if as_json:
        print(json.dumps([r.to_dict() | ({"problem": MISSING} if r.name in missing else {}) for r in records]
                         + [{"name": d.name, "damaged": d.problem} for d in damaged], indent=2))
        return
    if not records and not damaged:
        out.print("no concepts registered yet (persres train IMAGES_DIR --name NAME --class CLASS)", markup=False)
        return
    from rich.table import Column, Table

    from persres.families import label

    wide = out.width >= 120  # a narrow terminal drops base model and date; names, identifiers and hashes are never cut
    table = Table(Column("name", overflow="fold"), Column("class", overflow="fold"), Column("identifier", overflow="fold"),
                  Column("family", no_wrap=True), Column("params", no_wrap=True), Column("loss", overflow="fold"),
                  *((Column("base model", overflow="fold"), Column("created", overflow="fold")) if wide else ()))
    for r in records:
        m = r.meta
        loss = f"{m.loss_start:.3f} -> {m.loss_end:.3f}" if m.loss_start is not None else ""
        loss = f"[red]{MISSING}[/]" if m.name in missing else loss
        ident = m.identifier + (" (shared)" if r.shared_identifier else "")
        table.add_row(m.name, m.class_word, ident, label(m.family), f"{m.parameter_count:,}", loss, *((m.base_model, m.created_at) if wide else ()))
    for d in damaged:
        table.add_row(d.name, "[red]damaged[/]", "", "", "", d.problem, *(("", "") if wide else ()))
    out.print(table)


@app.command(cls=Command)
@command
def show(name: Annotated[str, typer.Argument(metavar="NAME", help="A registered concept.")], as_json: JsonOption = False):
    """Show everything the registry knows about a concept."""
    record = registry().get(name)
    data = record.to_dict() | ({} if record.path.is_file() else {"problem": MISSING})
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Column, Table

    table = Table(Column("field", no_wrap=True), Column("value", overflow="fold"), show_header=False)
    for key, value in data.items():
        if key in ("ranks", "channels"):
            value = ", ".join(sorted({str(v) for v in value.values()}, key=int))
        elif key == "layers":  # a LoRA's other layers: how many of each kind, and their ranks
            value = "; ".join(f"{kind} x{n}" for kind, n in layer_kinds(value).items()) + \
                (f" (ranks {', '.join(sorted({str(v[0]) for v in value.values()}, key=int))})" if value else "")
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out.print(table)


@app.command(cls=Command)
@command
def rm(name: Annotated[str, typer.Argument(metavar="NAME", help="A registered concept.")]):
    """Remove a concept and its pack file."""
    path = registry().remove(name)
    out.print(f"removed {name} ({path})", markup=False)


@app.command(cls=Command)
@command
def export(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A registered concept.")],
    output: Annotated[str, typer.Option("--output", "-o", help="File to write.", metavar="PATH")],
    fmt: Annotated[str, typer.Option("--format", help="persres (re-importable), diffusers, or kohya (A1111, ComfyUI).", metavar="FORMAT")] = "persres",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
):
    """Export a concept: its pack, or a LoRA file diffusers, A1111 or ComfyUI load."""
    from persres.interop import export_concept

    reg = registry()
    export_concept(reg, name, output, fmt, force)
    meta = reg.get(name).meta
    out.print(f"wrote {output} ({fmt}); identifier {meta.identifier!r}: prompt it as '{meta.identifier} {meta.class_word}'", markup=False)


@app.command("import", cls=Command)
@command
def import_(
    file: Annotated[Path, typer.Argument(metavar="PATH", help="A persres pack, or a kohya / diffusers / peft LoRA of any layers.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Register under this name (needed for a foreign LoRA).", metavar="NAME")] = None,
    class_word: Annotated[Optional[str], typer.Option("--class", help="The concept's class word (a foreign LoRA only; a pack keeps its own).",
                                                      metavar="WORD")] = None,
    identifier: Annotated[Optional[str], typer.Option("--identifier", help="The word that calls the concept (a foreign LoRA only) "
                                                      "[default: the file's trigger word, else a fresh one].", metavar="WORD")] = None,
    model: ModelOption = None,
    model_config: ConfigOption = None,
    proj_out_only: Annotated[bool, typer.Option("--proj-out-only", help="Keep only a foreign LoRA's proj_out layers (the rest dropped, with a warning).")] = False,
    everywhere: Annotated[bool, typer.Option("--everywhere", help="A style: under --lag it acts on the whole image, not in a region of its own.")] = False,
):
    """Register a pack file (from `persres export`) or a LoRA from another tool, every layer it changes kept."""
    record = workspace(model, model_config).import_concept(file, name, class_word, identifier, proj_out_only=proj_out_only,
                                                           everywhere=everywhere)
    shared = " (shared with another concept: they cannot share a prompt)" if record.shared_identifier else ""
    scope = "; acts everywhere under --lag" if record.meta.everywhere else ""
    held = f", {len(record.meta.layers)} layers" if record.meta.layers else ""
    out.print(f"imported {record.name} ({record.meta.class_word}, identifier {record.meta.identifier!r}{held}{shared}{scope})", markup=False)


@app.command(cls=Command)
@command
def doctor(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed (moves files to orphans/, never deletes packs).")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="A new registry.db from the packs (and orphans/); the old one kept aside.")] = False,
):
    """Check that registry rows and pack files agree; report (and with --repair, fix) what does not."""
    from persres.errors import RegistryError
    from persres.registry import persres_home

    if rebuild:
        from persres.registry.rebuild import rebuild as rebuild_registry

        report = rebuild_registry(persres_home())
        if report.resumed:
            out.print("finishing a rebuild that was interrupted", markup=False)
        for line in (*(f"kept aside: {p}" for p in report.kept_aside), *(f"carried over {c}" for c in report.carried),
                     *(f"restored {r}" for r in report.restored), *(f"refused {r}" for r in report.refused)):
            out.print(line, markup=False, highlight=False)
        out.print(f"{len(report.restored)} concepts restored, {len(report.refused)} files refused", markup=False)
        raise typer.Exit(1 if report.refused else 0)
    try:
        reg = registry()
    except RegistryError as e:  # doctor is the tool for a registry that cannot be opened: it says what to do
        out.print(f"{e}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    for note in reg.notes:
        out.print(note, markup=False)
    problems = reg.doctor(repair=repair)
    for p in problems:
        out.print(p, markup=False)
    good, damaged = reg.scan()
    out.print(f"{len(good)} concepts, {len(damaged)} damaged rows, {len(problems)} problems"
              f"{' repaired' if repair and problems else ''}; registry {reg.db_path}", markup=False)
    if problems and not repair:
        raise typer.Exit(1)


@config_app.command("model", cls=Command)
@command
def config_model(
    value: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Diffusers directory, .safetensors/.ckpt checkpoint or hub id to use by default.")] = None,
    model_config: Annotated[Optional[str], typer.Option("--config", help="Diffusers directory with the configs of a single-file model (offline).",
                                                        metavar="DIR")] = None,
    unset: Annotated[bool, typer.Option("--unset", help="Go back to the built-in toy model.")] = False,
):
    """Show or set the default base model (PERSRES_MODEL, when set, wins)."""
    from persres.workspace import default_model, set_default_model

    reg = registry()
    if unset or value is not None:
        set_default_model(reg, None if unset else value, model_config)
    current, config_dir = default_model(reg)
    out.print(current + (f" (configs: {config_dir})" if config_dir else ""), markup=False, highlight=False)
