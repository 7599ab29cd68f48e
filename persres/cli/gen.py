"""`persres gen` and `persres eval`: images with concepts (with or without LAG), and their scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from persres.cli.root import Command, ConfigOption, DeviceOption, JsonOption, ModelOption, PrecisionOption, app, command, out, say_download, workspace
from persres.cli.progress import bar


@app.command(cls=Command)
@command
def gen(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="Prompt; V1, V2.. bind to -c in order, V* to the only one, <name> to a concept.")],
    concept: Annotated[list[str], typer.Option("--concept", "-c", metavar="NAME[:STRENGTH]",
                                               help="A registered concept, NAME or NAME:STRENGTH (residual scale 0-2, default 1); repeatable.")] = [],
    lag: Annotated[bool, typer.Option("--lag/--no-lag", help="Localized attention-guided sampling.")] = False,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps, with the model's own sampler [default: the model family's; "
                                                     "the paper's 50].", metavar="INTEGER")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale [default: the model family's; the paper's 6.0].",
                                                      metavar="FLOAT")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed + i.", metavar="INTEGER")] = 0,
    n: Annotated[int, typer.Option("-n", help="Number of images.", metavar="INTEGER")] = 1,
    height: Annotated[Optional[int], typer.Option(help="Image height [default: the model's].", metavar="PIXELS")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width [default: the model's].", metavar="PIXELS")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.", metavar="DIR")] = Path("."),
    model: ModelOption = None,
    model_config: ConfigOption = None,
    save_masks: Annotated[bool, typer.Option("--save-masks", help="Also write each concept's LAG region overlay.")] = False,
    sheet: Annotated[bool, typer.Option("--sheet", help="Also write all images (and masks) of the call on one enlarged sheet.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files of the same name [default: the next free number].")] = False,
    force_size: Annotated[bool, typer.Option("--force-size", help="Sample a size past 4x the model's or beyond the memory estimate.")] = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    backend: Annotated[str, typer.Option(help="Attention backend: auto, sdpa, xformers or reference.", metavar="BACKEND")] = "auto",
):
    """Generate images with zero, one or several concepts, with or without LAG."""
    from persres.errors import InputError

    if save_masks and not lag:
        raise InputError("--save-masks shows LAG regions: add --lag")
    ws = workspace(model, model_config, device, precision)
    with bar("generating", "steps") as progress:
        task = progress.add_task("gen", total=None)
        result = ws.generate(prompt, concept, out_dir=out_dir, backend=backend, sheet=sheet, overwrite=overwrite, force_size=force_size,
                             on_download=say_download, on_step=lambda done, total: progress.update(task, completed=done, total=total),
                             steps=steps, guidance=guidance, lag=lag, seed=seed, num_images=n, height=height, width=width,
                             save_masks=save_masks)  # unset steps and guidance: the model family's
    for p in result.paths:
        out.print(str(p), markup=False, highlight=False)


def scores_table(title: str, rows: list[dict]):
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("concept", "category", "method")))
    table = Table(*(["concept", "method"] if rows and "method" in rows[0] else []), *keys, title=title)
    for r in rows:
        lead = [r["concept"], r["method"]] if "method" in r else []
        table.add_row(*lead, *(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
    return table


@app.command("eval", cls=Command)
@command
def eval_(
    samples: Annotated[Path, typer.Argument(metavar="SAMPLES_DIR", help="Folder of generated images.")],
    refs: Annotated[list[Path], typer.Option("--refs", help="Folder of reference images (repeat for multi-concept targets).", metavar="DIR")],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="prompts.json {image stem: prompt} (default: each PNG's metadata).",
                                                    metavar="PATH")] = None,
    clip: Annotated[str, typer.Option(help="CLIP model: directory or hub id.", metavar="MODEL")] = "openai/clip-vit-base-patch32",
    dino: Annotated[str, typer.Option(help="DINO model: directory or hub id.", metavar="MODEL")] = "facebook/dino-vits16",
    keep_identifier: Annotated[bool, typer.Option("--keep-identifier", help="Score CLIP-T on the prompt with the identifier left in.")] = False,
    strip: Annotated[list[str], typer.Option("--strip", help="Extra token to remove from prompts before CLIP-T (e.g. '<new1>').", metavar="TOKEN")] = [],
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
):
    """Score generated images: CLIP text alignment, CLIP and DINO image alignment (the paper's metrics)."""
    from persres.eval.folder import score_folder

    scores = score_folder(samples, refs, clip, dino, device, prompts, keep_identifier, strip).to_dict()
    if as_json:
        print(json.dumps(scores, indent=2))
    else:
        out.print(scores_table(str(samples), [scores]))
