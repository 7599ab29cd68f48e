"""The `persres` command: parse options, make one library call, render with Rich.

No SQL and no torch here; heavy modules are imported inside the commands so that
`persres list` starts instantly. Every `PersresError` becomes one line on stderr and exit 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup


class OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, an unknown option, a value of the wrong type) as one
    `error:` line and exit code 1, like every other bad input, instead of click's usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            err.print("interrupted", markup=False)
            rv = 130
        except typer.TyperException as e:  # click's usage errors, as Typer vendors them
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `persres` or `persres config`: help, not an error
                e.show()
                rv = 0
            else:
                where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
                err.print(f"error: {' '.join(e.format_message().split())}{where}", markup=False)
                rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    help="Personalized residuals for Stable Diffusion: learn a concept from a few photos, draw it anywhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrors,
    rich_markup_mode=None,  # help strings render as written: "[default: 150, paper]" is text, not markup
)
config_app = typer.Typer(help="Show or change persres settings (the default model).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
bench_app = typer.Typer(help="Benchmarks of the method: CustomConcept101 (CLIP/DINO) and the toy world.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(bench_app, name="bench")
out = Console(soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if category.__module__.startswith("persres"):
        err.print(f"warning: {message}", markup=False)


def command(fn):
    """Turn persres errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from persres.errors import PersresError

        _quiet_libraries()
        warnings.showwarning = _show_warning
        try:
            return fn(*args, **kwargs)
        except PersresError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was registered", markup=False)
            raise typer.Exit(130) from None
        except OSError as e:  # the filesystem said no: a path we could not create, read or write
            where = f": {e.filename}" if e.filename else ""
            err.print(f"error: {e.strerror or e}{where}", markup=False)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as e:  # a bug: still one line; PERSRES_DEBUG=1 shows the traceback
            if os.environ.get("PERSRES_DEBUG"):
                raise
            err.print(f"error: internal error {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                      "(please report it; PERSRES_DEBUG=1 shows the traceback)", markup=False)
            raise typer.Exit(1) from None

    return wrapper


def _progress(label: str, unit: str, *fields: str):
    """One Rich progress bar on stderr (off when stderr is not a terminal): label, bar, done/total, speed, ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} {unit}/s" if task.speed else "")

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), *map(TextColumn, fields),
                    Speed(), TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


def _registry():
    from persres.registry import Registry

    registry = Registry()
    for note in registry.notes:  # leftovers of a crashed writer, moved aside at start
        err.print(f"note: {note}", markup=False)
    return registry


def _model(registry, model: Optional[str], model_config: Optional[str] = None) -> str:
    """The model to use, checked before any work (a bad path or checkpoint is one line, not a late failure)."""
    from persres.api import model_config_for, model_for
    from persres.models import check_model_value, check_single_file_config, is_single_file

    if model is not None:
        check_model_value(model)
    resolved, first_toy = model_for(registry, model)
    if is_single_file(resolved):
        check_single_file_config(resolved, model_config_for(registry, resolved, model_config))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if first_toy:
        err.print("note: using persres's built-in toy model; pass --model, set PERSRES_MODEL or run "
                  "`persres config model PATH_OR_HUB_ID` to use real Stable Diffusion weights", markup=False)
    return resolved


@app.command()
@command
def train(
    images_dir: str = typer.Argument(..., help="Folder of 3-15 photos of one thing, or toy:NAME for a shipped toy concept."),
    name: str = typer.Option(..., "--name", help="Name to register the concept under."),
    class_word: str = typer.Option("auto", "--class", help='The concept\'s class word, e.g. "dog"; auto: suggested by the model (see suggest-class).'),
    model: Optional[str] = typer.Option(None, help="Diffusers directory, .safetensors/.ckpt checkpoint, hub id, or 'toy'."),
    model_config: Optional[str] = typer.Option(None, "--config", help="Diffusers directory with the configs of a single-file --model (offline)."),
    steps: Optional[int] = typer.Option(None, help="Training steps [default: 150, paper]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [default: 4, paper]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: 1e-3, paper]."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant, or cosine: decays the learning rate to 0 over the steps [default: constant]."),
    snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR-γ loss weights: steps with less noise than SNR γ count less (5 is usual) [default: off, paper]."),
    rank_ratio: Optional[float] = typer.Option(None, help="Rank as a fraction of channels [default: 0.05, paper]."),
    rank: Optional[int] = typer.Option(None, help="Fixed rank for every block (overrides --rank-ratio)."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution [default: the model's]."),
    seed: Optional[int] = typer.Option(None, help="Random seed [default: 0]."),
    init: Optional[str] = typer.Option(None, help="Factor init: zero (A=0) or random [default: zero]."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Also train on mirrored references [default: on]."),
    scale_min: Optional[float] = typer.Option(None, help="Zoom-out views: references also shrunk to [scale_min, 1) at random places, 1 = off [default: 1]."),
    prompt: Optional[str] = typer.Option(None, help='Training prompt template [default: "a photo of a {identifier} {class_word}", paper].'),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16 or bf16."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing", help="Trade compute for memory (small GPUs)."),
):
    """Learn a concept's residuals from a folder of images and register the pack."""
    from persres.api import effective_settings, settings_sources, train_concept, train_config_for

    registry = _registry()
    registry.check_new_name(name)
    resolved = _model(registry, model, model_config)
    overrides = dict(steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, snr_gamma=snr_gamma, rank_ratio=rank_ratio, rank=rank,
                     resolution=resolution, seed=seed, init=init, flip=flip, scale_min=scale_min, prompt=prompt, device=device if device != "auto" else None,
                     precision=precision if precision != "auto" else None, gradient_checkpointing=gradient_checkpointing)
    config = train_config_for(resolved, overrides)
    sources = settings_sources(resolved, overrides)
    out.print(f"settings: {effective_settings(config, sources)}", markup=False, highlight=False)
    with _progress(f"training {name}", "steps", "loss {task.fields[loss]}") as bar:
        task = bar.add_task("train", total=config.steps, loss="...")
        outcome = train_concept(images_dir, name, class_word, model=resolved, config=config, registry=registry,
                                progress=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4f}"),
                                sources=sources, model_config=model_config, on_suggested=_say_suggested)
    rec = outcome.record
    out.print(f"trained [bold]{name}[/] ({rec.meta.parameter_count:,} parameters, loss {rec.meta.loss_start:.4f} -> "
              f"{rec.meta.loss_end:.4f}) in {outcome.seconds:.1f}s; pack {rec.path}; prompt it as "
              f"'<{name}>' or 'V*' (identifier {rec.meta.identifier!r})")


def _say_suggested(suggestion) -> None:
    from persres.cli.suggest import describe

    out.print(f"class: {describe(suggestion)}, suggested by the model in {suggestion.evaluations} UNet evaluations "
              f"({suggestion.seconds:.1f}s); give --class to choose", markup=False)


@app.command()
@command
def gen(
    prompt: str = typer.Argument(..., help='Prompt; V1, V2.. bind to -c in order, V* to the only one, <name> to a concept.'),
    concept: list[str] = typer.Option([], "--concept", "-c", help="A registered concept, NAME or NAME:STRENGTH (residual scale 0-2, default 1); repeatable."),
    lag: bool = typer.Option(False, "--lag/--no-lag", help="Localized attention-guided sampling."),
    steps: int = typer.Option(50, help="DDIM steps [paper: 50]."),
    guidance: float = typer.Option(6.0, help="Classifier-free guidance scale [paper: 6.0]."),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    n: int = typer.Option(1, "-n", help="Number of images."),
    height: Optional[int] = typer.Option(None, help="Image height [default: the model's]."),
    width: Optional[int] = typer.Option(None, help="Image width [default: the model's]."),
    out_dir: Path = typer.Option(Path("."), "--out", help="Output folder."),
    model: Optional[str] = typer.Option(None, help="Diffusers directory, .safetensors/.ckpt checkpoint, hub id, or 'toy'."),
    model_config: Optional[str] = typer.Option(None, "--config", help="Diffusers directory with the configs of a single-file --model (offline)."),
    save_masks: bool = typer.Option(False, "--save-masks", help="Also write each concept's LAG region overlay."),
    sheet: bool = typer.Option(False, "--sheet", help="Also write all images (and masks) of the call on one enlarged sheet."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16 or bf16."),
    backend: str = typer.Option("auto", help="Attention backend: auto, sdpa, xformers or reference."),
):
    """Generate images with zero, one or several concepts, with or without LAG."""
    from persres.api import generate_images
    from persres.config import SampleConfig
    from persres.errors import InputError

    if save_masks and not lag:
        raise InputError("--save-masks shows LAG regions: add --lag")
    config = SampleConfig(steps=steps, guidance=guidance, lag=lag, seed=seed, num_images=n,
                          height=height, width=width, save_masks=save_masks)
    registry = _registry()
    resolved = _model(registry, model, model_config)
    with _progress("generating", "steps") as bar:
        task = bar.add_task("gen", total=n * steps)
        paths, _ = generate_images(prompt, concept, config=config, model=resolved, out_dir=out_dir,
                                   registry=registry, device=device, precision=precision, backend=backend,
                                   sheet=sheet, on_step=lambda done, total: bar.update(task, completed=done),
                                   model_config=model_config)
    for p in paths:
        out.print(str(p), markup=False, highlight=False)


@app.command("list")
@command
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List registered concepts."""
    records, damaged = _registry().scan()
    if as_json:
        print(json.dumps([r.to_dict() for r in records] + [{"name": d.name, "damaged": d.problem} for d in damaged], indent=2))
        return
    from rich.table import Column

    from persres.families import label

    wide = out.width >= 120  # a narrow terminal drops base model and date; names, identifiers and hashes are never cut
    table = Table(Column("name", overflow="fold"), Column("class", overflow="fold"), Column("identifier", overflow="fold"),
                  Column("family", no_wrap=True), Column("params", no_wrap=True), Column("loss", overflow="fold"),
                  *((Column("base model", overflow="fold"), Column("created", overflow="fold")) if wide else ()))
    for r in records:
        m = r.meta
        loss = f"{m.loss_start:.3f} -> {m.loss_end:.3f}" if m.loss_start is not None else ""
        ident = m.identifier + (" (shared)" if r.shared_identifier else "")
        table.add_row(m.name, m.class_word, ident, label(m.family), f"{m.parameter_count:,}", loss, *((m.base_model, m.created_at) if wide else ()))
    for d in damaged:
        table.add_row(d.name, "[red]damaged[/]", "", "", "", d.problem, *(("", "") if wide else ()))
    out.print(table if records or damaged else "no concepts registered yet (persres train IMAGES_DIR --name NAME --class CLASS)")


@app.command()
@command
def show(name: str, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show everything the registry knows about a concept."""
    record = _registry().get(name)
    data = record.to_dict()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Column

    table = Table(Column("field", no_wrap=True), Column("value", overflow="fold"), show_header=False)
    for key, value in data.items():
        if key in ("ranks", "channels"):
            value = ", ".join(sorted({str(v) for v in value.values()}, key=int))
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out.print(table)


@app.command()
@command
def rm(name: str):
    """Remove a concept and its pack file."""
    path = _registry().remove(name)
    out.print(f"removed {name} ({path})", markup=False)


@app.command()
@command
def export(
    name: str,
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
    fmt: str = typer.Option("persres", "--format", help="persres (re-importable), diffusers, or kohya (A1111, ComfyUI)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
):
    """Export a concept: its pack, or a LoRA file diffusers, A1111 or ComfyUI load."""
    from persres.interop import write_lora
    from persres.registry.store import check_export_target

    registry = _registry()
    if fmt == "persres":
        registry.export_pack(name, output, force=force)
    else:
        tensors, meta = registry.load(name)
        check_export_target(output, registry, force)
        write_lora(output, fmt, tensors, meta)
    meta = registry.get(name).meta
    out.print(f"wrote {output} ({fmt}); identifier {meta.identifier!r}: prompt it as '{meta.identifier} {meta.class_word}'",
              markup=False)


@app.command("import")
@command
def import_(
    file: Path = typer.Argument(..., help="A persres pack, or a kohya / diffusers / peft LoRA of the proj_out layers."),
    name: Optional[str] = typer.Option(None, "--name", help="Register under this name (needed for a foreign LoRA)."),
    class_word: Optional[str] = typer.Option(None, "--class", help="The concept's class word (needed for a foreign LoRA)."),
    identifier: Optional[str] = typer.Option(None, "--identifier", help="The token that calls the concept [default: the file's, else a fresh one]."),
    model: Optional[str] = typer.Option(None, help="Base model a foreign LoRA is fitted to [default: the configured model]."),
    model_config: Optional[str] = typer.Option(None, "--config", help="Diffusers directory with the configs of a single-file --model (offline)."),
    proj_out_only: bool = typer.Option(False, "--proj-out-only", help="Drop a foreign LoRA's targets other than proj_out (with a warning)."),
):
    """Register a pack file (from `persres export`) or a proj_out LoRA from another tool."""
    from persres.api import import_concept

    registry = _registry()
    record = import_concept(file, name, class_word, identifier, model=_model(registry, model, model_config),
                            registry=registry, proj_out_only=proj_out_only, model_config=model_config)
    shared = " (shared with another concept: they cannot share a prompt)" if record.shared_identifier else ""
    out.print(f"imported {record.name} ({record.meta.class_word}, identifier {record.meta.identifier!r}{shared})", markup=False)


@app.command()
@command
def doctor(repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed (moves files to orphans/, never deletes packs).")):
    """Check that registry rows and pack files agree; report (and with --repair, fix) what does not."""
    registry = _registry()
    for note in registry.notes:
        out.print(note, markup=False)
    problems = registry.doctor(repair=repair)
    for p in problems:
        out.print(p, markup=False)
    good, damaged = registry.scan()
    out.print(f"{len(good)} concepts, {len(damaged)} damaged rows, {len(problems)} problems"
              f"{' repaired' if repair and problems else ''}; registry {registry.db_path}", markup=False)
    if problems and not repair:
        raise typer.Exit(1)


@config_app.command("model")
@command
def config_model(
    value: Optional[str] = typer.Argument(None, help="Diffusers directory, .safetensors/.ckpt checkpoint or hub id to use by default."),
    model_config: Optional[str] = typer.Option(None, "--config", help="Diffusers directory with the configs of a single-file model (offline)."),
    unset: bool = typer.Option(False, "--unset", help="Go back to the built-in toy model."),
):
    """Show or set the default base model (PERSRES_MODEL, when set, wins)."""
    from persres.api import DEFAULT_MODEL_CONFIG_KEY, DEFAULT_MODEL_KEY
    from persres.errors import InputError

    registry = _registry()
    if unset:
        registry.set_setting(DEFAULT_MODEL_KEY, None)
        registry.set_setting(DEFAULT_MODEL_CONFIG_KEY, None)
    elif value is not None:
        from persres.models import check_model_value, is_single_file, load_pipeline

        registry.require_writable()
        checked = check_model_value(value)
        if model_config is not None and not is_single_file(checked):
            raise InputError("--config is for single-file checkpoints; a diffusers directory or hub id carries its own")
        if is_single_file(checked):  # proven loadable now, not at the first train
            load_pipeline(checked, config=model_config)
        registry.set_setting(DEFAULT_MODEL_KEY, checked)
        registry.set_setting(DEFAULT_MODEL_CONFIG_KEY, str(Path(model_config).expanduser().resolve()) if model_config else None)
    current = os.environ.get("PERSRES_MODEL") or registry.setting(DEFAULT_MODEL_KEY) or "toy"
    config_dir = registry.setting(DEFAULT_MODEL_CONFIG_KEY) if not os.environ.get("PERSRES_MODEL") else None
    out.print(current + (f" (configs: {config_dir})" if config_dir else ""), markup=False, highlight=False)


def _scores_table(title: str, rows: list[dict]) -> Table:
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("concept", "category", "method")))
    table = Table(*(["concept", "method"] if rows and "method" in rows[0] else []), *keys, title=title)
    for r in rows:
        lead = [r["concept"], r["method"]] if "method" in r else []
        table.add_row(*lead, *(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
    return table


@app.command("eval")
@command
def eval_(
    samples: Path = typer.Argument(..., help="Folder of generated images."),
    refs: list[Path] = typer.Option(..., "--refs", help="Folder of reference images (repeat for multi-concept targets)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="prompts.json {image stem: prompt} (default: each PNG's metadata)."),
    clip: str = typer.Option("openai/clip-vit-base-patch32", help="CLIP model: directory or hub id."),
    dino: str = typer.Option("facebook/dino-vits16", help="DINO model: directory or hub id."),
    keep_identifier: bool = typer.Option(False, "--keep-identifier", help="Score CLIP-T on the prompt with the identifier left in."),
    strip: list[str] = typer.Option([], "--strip", help="Extra token to remove from prompts before CLIP-T (e.g. '<new1>')."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Score generated images: CLIP text alignment, CLIP and DINO image alignment (the paper's metrics)."""
    from persres.eval.folder import eval_folder
    from persres.eval.metrics import Scorer
    from persres.models import pick_device

    scorer = Scorer(clip, dino, pick_device(device))
    scores = eval_folder(samples, refs, scorer, prompts, keep_identifier, strip).to_dict()
    if as_json:
        print(json.dumps(scores, indent=2))
    else:
        out.print(_scores_table(str(samples), [scores]))


@bench_app.command("customconcept101")
@command
def bench_cc101(
    root: Path = typer.Option(..., "--root", help="Your copy of the customconcept101 folder (dataset.json, prompts/, images)."),
    concepts: Optional[int] = typer.Option(None, "--concepts", help="The first N concepts."),
    concept: list[str] = typer.Option([], "--concept", help="A concept by its folder name, e.g. pet_dog1 (repeatable)."),
    multiconcept: bool = typer.Option(False, "--multiconcept", help="Also the pairs of dataset_multiconcept.json whose concepts are selected."),
    samples_per_prompt: int = typer.Option(50, help="Samples per prompt [paper: 50]."),
    prompts_per_concept: int = typer.Option(20, help="Prompts per concept [paper: 20]."),
    lag: str = typer.Option("both", "--lag", help="both, on or off."),
    out_dir: Path = typer.Option(Path("bench-cc101"), "--out", help="Output folder (resumable)."),
    model: Optional[str] = typer.Option(None, help="Base model [paper: CompVis/stable-diffusion-v1-4]."),
    steps: int = typer.Option(50, help="DDIM steps [paper: 50]."),
    guidance: float = typer.Option(6.0, help="Guidance scale [paper: 6.0]."),
    train_steps: Optional[int] = typer.Option(None, help="Training steps [default: 150, paper]."),
    clip: str = typer.Option("openai/clip-vit-base-patch32", help="CLIP model: directory or hub id."),
    dino: str = typer.Option("facebook/dino-vits16", help="DINO model: directory or hub id."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16 or bf16."),
):
    """Train, sample and score CustomConcept101 concepts; write CSV, JSON and a Figure-7 plot."""
    from persres.api import model_config_for, train_config_for
    from persres.config import SampleConfig
    from persres.errors import InputError
    from persres.eval.bench import BenchConfig, run_bench, summarize, work_units
    from persres.eval.cc101 import load_concepts, load_pairs, select
    from persres.eval.metrics import Scorer
    from persres.models import load_pipeline, pick_device, pick_dtype

    modes = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}.get(lag)
    if modes is None:
        raise InputError(f"--lag must be both, on or off, got {lag!r}")
    if samples_per_prompt <= 0 or prompts_per_concept <= 0:
        raise InputError("--samples-per-prompt and --prompts-per-concept must be positive")
    from persres.scale import cluster

    registry = _registry()
    resolved = _model(registry, model)
    chosen = select(load_concepts(root), concept, concepts)
    keys = {c.key for c in chosen}
    pairs = [p for p in load_pairs(root) if {p.first.key, p.second.key} <= keys] if multiconcept else []
    with cluster(device) as here:
        if here.multi_node:
            raise InputError("bench customconcept101 shards over one machine's processes (they share its registry); "
                             "across machines, train the packs with `persres train-many --shards` first")
        dev = here.device if here.state is not None else pick_device(device)
        cfg = BenchConfig(
            out=out_dir, modes=modes, prompts_per_concept=prompts_per_concept, samples_per_prompt=samples_per_prompt,
            sample=SampleConfig(steps=steps, guidance=guidance),
            train=train_config_for(resolved, {"steps": train_steps, "device": device, "precision": precision}),
            model=resolved, clip=clip, dino=dino,
        )
        scorer = Scorer(clip, dino, dev)
        pipe = load_pipeline(resolved, dev, pick_dtype(precision, dev), model_config_for(registry, resolved))
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not here.main) as bar:
            task = bar.add_task("", total=len(here.split(range(work_units(chosen, pairs, cfg)))))  # this process's share
            rows = run_bench(chosen, pairs, cfg, scorer, pipe, registry, cluster=here,
                             log=lambda m: bar.update(task, description=m[:60]), advance=lambda n: bar.advance(task, n))
        if not here.main:
            return
    out.print(_scores_table("CustomConcept101", rows))
    summary = summarize(rows)
    out.print(_scores_table("overall", [{"concept": "all", "method": k, **v} for k, v in summary["overall"].items()]))
    out.print(f"results in {out_dir}/results.csv, results.json, figure.png")


@bench_app.command("toy")
@command
def bench_toy(
    quick: bool = typer.Option(False, "--quick", help="Fewer prompts, 2 samples, one seed (a few minutes on a CPU)."),
    concept: list[str] = typer.Option([], "--concept", help="A shipped toy concept [default: every concept of --set]."),
    concept_set: list[str] = typer.Option([], "--set", help="tuning, tuning_2 or held_out [default: all three]."),
    out_dir: Path = typer.Option(Path("bench-toy"), "--out", help="Output folder."),
    model: Optional[str] = typer.Option(None, help="Base model [default: the toy model]."),
    steps: int = typer.Option(50, help="DDIM steps (paper: 50)."),
    guidance: float = typer.Option(6.0, help="Guidance scale (paper: 6.0)."),
    samples: Optional[int] = typer.Option(None, help="Images per prompt and seed [default: 8; 2 with --quick]."),
    seeds: Optional[int] = typer.Option(None, help="Seeds per prompt [default: 2; 1 with --quick]."),
    singles: bool = typer.Option(True, "--singles/--no-singles", help="The one-concept categories."),
    pairs: bool = typer.Option(True, "--pairs/--no-pairs", help="Two concepts in one prompt."),
    category: list[str] = typer.Option([], "--category", help="Only these one-concept categories (identity, background, add_object, attribute)."),
    pair_method: list[str] = typer.Option([], "--pair-method", help="Only these two-concept methods (base, summed, lag)."),
    train_steps: Optional[int] = typer.Option(None, help="Training steps [default: the model's recommendation]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: the model's recommendation]."),
    lr_schedule: Optional[str] = typer.Option(None, help="constant or cosine [default: the model's recommendation]."),
    snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR-γ loss weights [default: the model's recommendation]."),
    init: Optional[str] = typer.Option(None, help="Factor init: zero or random [default: the model's recommendation]."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Flipped copies of the references [default: the model's recommendation]."),
    prompt: Optional[str] = typer.Option(None, help="Training prompt template [default: the model's recommendation]."),
    rank_ratio: Optional[float] = typer.Option(None, help="Rank as a fraction of channels [default: the model's recommendation]."),
    scale_min: Optional[float] = typer.Option(None, help="Zoom-out views down to this scale, 1 = off [default: the model's recommendation]."),
    strength: float = typer.Option(1.0, help="Every concept's residual scaled by this when sampling, 0-2 (as gen -c NAME:S)."),
    lag_tokens: Optional[str] = typer.Option(None, help="Several concepts: region tokens, identifier+class, class or identifier."),
    lag_coverage: Optional[float] = typer.Option(None, help="Several concepts: fraction of pixels in each mask (0.5: median)."),
    lag_maps: Optional[str] = typer.Option(None, help="Several concepts: block (each block's own) or aggregate (previous evaluation's, all blocks)."),
    lag_delay: Optional[float] = typer.Option(None, help="Several concepts: fraction of steps the base model runs alone first."),
    lag_conflict: Optional[str] = typer.Option(None, help="Several concepts: where masks overlap, normalized (max-normalized map) or raw (attention) wins."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16: training and sampling."),
    class_words: str = typer.Option("given", "--class-words", help="given (each concept's true shape) or suggested (what `train --class auto` picks; prompts use it)."),
):
    """Train the toy concepts and score identity, background, added objects, attributes and concept pairs, with and without LAG."""
    import dataclasses

    import torch

    from persres.api import model_config_for, train_config_for
    from persres.config import MultiLagConfig, SampleConfig
    from persres.models import load_pipeline, pick_dtype
    from persres.tokens import check_strength
    from persres.toy.bench import ToyBenchConfig, prepare_concepts, run_toy_bench, select_concepts, summarize

    names = select_concepts(concept, concept_set)
    multi = MultiLagConfig(**{k: v for k, v in {"tokens": lag_tokens, "coverage": lag_coverage, "maps": lag_maps, "delay": lag_delay,
                                                 "conflict": lag_conflict}.items() if v is not None})
    registry = _registry()
    resolved = _model(registry, model)
    config = train_config_for(resolved, {"steps": train_steps, "lr": lr, "lr_schedule": lr_schedule, "snr_gamma": snr_gamma, "init": init, "flip": flip, "prompt": prompt,
                                          "rank_ratio": rank_ratio, "scale_min": scale_min, "precision": precision})
    cfg = ToyBenchConfig(samples=samples or (2 if quick else 8), seeds=tuple(range(seeds or (1 if quick else 2))), quick=quick,
                         singles=singles, pairs=pairs, categories=tuple(category) or None,
                         pair_methods=tuple(pair_method) or ("base", "summed", "lag"),
                         sample=SampleConfig(steps=steps, guidance=guidance, multi=multi),
                         strength=check_strength(strength, "--strength"))
    dtype = pick_dtype(precision, torch.device("cpu"))
    pipe = load_pipeline(resolved, dtype=dtype, config=model_config_for(registry, resolved))
    out_dir.mkdir(parents=True, exist_ok=True)
    with err.status("training the toy concepts (reused when already trained with this config)..."):
        loaded = prepare_concepts(pipe, names, registry, resolved, config, class_words)
    meta = {"class_words": class_words, "class_word_of": {n: c.bound.class_word for n, c in loaded.items()},
            "train": config.to_dict(), "model": resolved, "multi_lag": dataclasses.asdict(multi), "samples": cfg.samples,
            "seeds": list(cfg.seeds), "quick": quick, "sample_steps": steps, "guidance": guidance, "strength": cfg.strength,
            "sample_dtype": str(dtype).removeprefix("torch.")}
    with err.status("sampling and scoring...") as status:
        rows = run_toy_bench(pipe, loaded, out_dir, cfg, log=lambda m: status.update(f"sampling and scoring: {m}"), meta=meta)
    summary = summarize(rows)
    keys = [k for k in ("identity", "drawn", "background", "added", "attribute", "both_present", "own_minus_other", "own_minus_other_2", "right_class")
            if any(k in r for r in summary)]
    from rich.table import Column

    table = Table(*(Column(h, no_wrap=True) for h in ("set", "category", "method", "n", *keys)),
                  title=f"toy bench ({'quick' if quick else 'full'}; mean ± 95% interval)")
    for r in summary:
        table.add_row(r["set"], r["category"], r["method"], str(r["n"]),
                      *(f"{r[k]:.2f}±{r[k + '_ci']:.2f}" if k in r else "" for k in keys))
    Console(width=max(out.width, 200)).print(table)  # never squeezed into a pipe's 80 columns
    out.print(f"results in {out_dir}/results.csv, results.json and grid-*.png")


def main() -> None:
    app(prog_name="persres")


if __name__ == "__main__":
    sys.exit(main())
