"""`persres train` and `persres suggest-class`: a concept from a folder of photos, and its class word."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from persres.cli.root import Command, opt, ConfigOption, DeviceOption, JsonOption, ModelOption, PrecisionOption, app, command, err, out, say_download, workspace
from persres.cli.progress import bar

from persres.settings import toy_defaults

TOY_DEFAULTS = toy_defaults()  # what the built-in toy model recommends, shown in the help


def _default(field: str, paper) -> str:
    """"[default: 150, paper; the toy model's: 1200]": the default, and the built-in model's own where it differs."""
    def shown(value) -> str:
        return "off" if value is None else repr(value) if field == "prompt" else f"{value:g}" if isinstance(value, float) else str(value)

    toy = TOY_DEFAULTS.get(field, paper)
    return f"[default: {shown(paper)}, paper" + ("" if toy == paper else f"; the toy model's: {shown(toy)}") + "]"


ImagesArgument = Annotated[str, typer.Argument(metavar="IMAGES_DIR", help="Folder of 3-15 photos of one thing, or toy:NAME for a shipped toy concept.")]


@app.command(cls=Command)
@command
def train(
    images_dir: ImagesArgument,
    name: Annotated[str, typer.Option("--name", help="Name to register the concept under.", metavar="NAME")],
    class_word: Annotated[str, typer.Option("--class", help='The concept\'s class word, e.g. "dog"; auto: suggested by the model (see suggest-class).',
                                            metavar="WORD")] = "auto",
    model: ModelOption = None,
    model_config: ConfigOption = None,
    steps: Annotated[Optional[int], opt(f"Training steps {_default('steps', 150)}.", "INTEGER")] = None,
    batch_size: Annotated[Optional[int], opt(f"Batch size {_default('batch_size', 4)}.", "INTEGER")] = None,
    lr: Annotated[Optional[float], opt(f"Learning rate {_default('lr', 1e-3)}.", "FLOAT")] = None,
    lr_schedule: Annotated[Optional[str], opt(f"constant, or cosine: decays the learning rate to 0 over the steps {_default('lr_schedule', 'constant')}.", "SCHEDULE")] = None,
    snr_gamma: Annotated[Optional[float], opt(f"Min-SNR-γ loss weights: steps with less noise than SNR γ count less (5 is usual) {_default('snr_gamma', None)}.",
                                               "FLOAT")] = None,
    rank_ratio: Annotated[Optional[float], opt(f"Rank as a fraction of channels {_default('rank_ratio', 0.05)}.", "FLOAT")] = None,
    rank: Annotated[Optional[int], opt("Fixed rank for every block (overrides --rank-ratio).", "INTEGER")] = None,
    resolution: Annotated[Optional[int], opt("Training resolution [default: the model's].", "PIXELS")] = None,
    seed: Annotated[Optional[int], opt("Random seed [default: 0].", "INTEGER")] = None,
    init: Annotated[Optional[str], opt("Factor init: zero (A=0) or random [default: zero].", "INIT")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Also train on mirrored references [default: on].")] = None,
    scale_min: Annotated[Optional[float], opt("Zoom-out views: references also shrunk to [scale_min, 1) at random places, 1 = off [default: 1].",
                                               "FLOAT")] = None,
    prompt: Annotated[Optional[str], opt(f"Training prompt template {_default('prompt', 'a photo of a {identifier} {class_word}')}.", "TEXT")] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Trade compute for memory (small GPUs).")] = None,
    force_size: Annotated[bool, typer.Option("--force-size", help="Train at a resolution past 4x the model's or beyond the memory estimate.")] = False,
):
    """Learn a concept's residuals from a folder of images and register the pack.

    Settings not given come from the model's own persres_defaults.json where it has one (the
    built-in toy model does: shown beside each default), else from the paper."""
    ws = workspace(model, model_config)
    overrides = dict(steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, snr_gamma=snr_gamma, rank_ratio=rank_ratio, rank=rank,
                     resolution=resolution, seed=seed, init=init, flip=flip, scale_min=scale_min, prompt=prompt,
                     device=device if device != "auto" else None, precision=precision if precision != "auto" else None,
                     gradient_checkpointing=gradient_checkpointing)
    with bar(f"{name}:", "steps", "loss {task.fields[loss]}", "{task.fields[phase]}") as progress:
        task = progress.add_task("train", total=None, loss="...", phase="")

        def settings_line(line: str) -> None:  # the inputs are checked: the settings, then the steps to come
            out.print(f"settings: {line}", markup=False, highlight=False)
            progress.update(task, total=ws.train_config(overrides).steps)

        outcome = ws.train(images_dir, name, class_word, overrides=overrides, on_suggested=_say_suggested, force_size=force_size,
                           on_settings=settings_line, on_download=say_download,
                           on_phase=lambda text: (progress.update(task, phase=text), progress.refresh()),  # each phase drawn
                           progress=lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.4f}"))
    rec = outcome.record
    out.print(f"trained [bold]{name}[/] ({rec.meta.parameter_count:,} parameters, loss {rec.meta.loss_start:.4f} -> "
              f"{rec.meta.loss_end:.4f}) in {outcome.seconds:.1f}s; pack {rec.path}; prompt it as "
              f"'<{name}>' or 'V*' (identifier {rec.meta.identifier!r})")


def _say_suggested(suggestion) -> None:
    from persres.suggest import describe

    out.print(f"class: {describe(suggestion)}, suggested by the model in {suggestion.evaluations} UNet evaluations "
              f"({suggestion.seconds:.1f}s); give --class to choose", markup=False)


@app.command("suggest-class", cls=Command)
@command
def suggest_class_command(
    images_dir: Annotated[str, typer.Argument(metavar="IMAGES_DIR", help="Folder of photos of one thing, or toy:NAME.")],
    model: ModelOption = None,
    model_config: ConfigOption = None,
    candidates: Annotated[Optional[str], opt("a,b,c or a file with one word per line [default: the model's list, else the built-in one].",
                                              "WORDS")] = None,
    top: Annotated[int, opt("How many to show.", "INTEGER")] = 5,
    seed: Annotated[int, opt("Seed of the shared (image, t, noise) draws.", "INTEGER")] = 0,
    budget: Annotated[int, opt("UNet sample-forwards to spend at most (1800: a default training run).", "INTEGER")] = 1800,
    as_json: JsonOption = False,
):
    """Suggest the class word: the candidate under which the base model denoises your images best."""
    from rich.table import Table

    from persres.suggest import SuggestConfig, describe

    config = SuggestConfig(budget=budget, seed=seed, top=top)
    ws = workspace(model, model_config)
    with err.status("asking the model (successive halving over the candidates)..."):
        suggestion = ws.suggest_class(images_dir, candidates, config)
    for entry, why in suggestion.rejected:
        err.print(f"note: left out candidate {entry!r}: {why}", markup=False)
    if as_json:
        print(json.dumps({"suggestion": suggestion.best, "top": suggestion.top(top), "evaluations": suggestion.evaluations,
                          "seconds": round(suggestion.seconds, 2), "rejected": suggestion.rejected}, indent=2))
        return
    table = Table("rank", "class", "mean error", "margin over next", "draws",
                  title=f"class suggestions ({suggestion.evaluations} UNet evaluations, {suggestion.seconds:.1f}s)")
    for i, (word, error, draws) in enumerate(suggestion.ranking[:top]):
        following = suggestion.ranking[i + 1][1] if i + 1 < len(suggestion.ranking) else None
        table.add_row(str(i + 1), word, f"{error:.5f}", "" if following is None else f"{following - error:+.5f}", str(draws))
    out.print(table)
    out.print(f"suggested class: {describe(suggestion)}", markup=False, highlight=False)
