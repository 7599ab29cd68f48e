"""`persres bench customconcept101` and `persres bench toy`: options in, one library call, tables out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from persres.cli.root import Command, opt, DeviceOption, ModelOption, PrecisionOption, bench_app, command, err, out, registry
from persres.cli.gen import scores_table
from persres.cli.progress import BarReporter, StatusReporter


def _written(report) -> None:
    for note in report.notes:
        err.print(f"note: {note}", markup=False)
    out.print("results in " + ", ".join(str(p) for p in report.written), markup=False, highlight=False)


@bench_app.command("customconcept101", cls=Command)
@command
def bench_cc101(
    root: Annotated[Path, opt("Your copy of the customconcept101 folder (dataset.json, prompts/, images).", "DIR", "--root")],
    concepts: Annotated[Optional[int], opt("The first N concepts.", "INTEGER", "--concepts")] = None,
    concept: Annotated[list[str], opt("A concept by its folder name, e.g. pet_dog1 (repeatable).", "NAME", "--concept")] = [],
    multiconcept: Annotated[bool, typer.Option("--multiconcept", help="Also the pairs of dataset_multiconcept.json whose concepts are selected.")] = False,
    samples_per_prompt: Annotated[int, opt("Samples per prompt [paper: 50].", "INTEGER")] = 50,
    prompts_per_concept: Annotated[int, opt("Prompts per concept [paper: 20].", "INTEGER")] = 20,
    lag: Annotated[str, opt("both, on or off.", "MODE", "--lag")] = "both",
    out_dir: Annotated[Path, opt("Output folder (resumable).", "DIR", "--out")] = Path("bench-cc101"),
    model: Annotated[Optional[str], opt("Base model [paper: CompVis/stable-diffusion-v1-4].", "MODEL", "--model")] = None,
    steps: Annotated[int, opt("DDIM steps [paper: 50].", "INTEGER")] = 50,
    guidance: Annotated[float, opt("Guidance scale [paper: 6.0].", "FLOAT")] = 6.0,
    train_steps: Annotated[Optional[int], opt("Training steps [default: 150, paper].", "INTEGER")] = None,
    clip: Annotated[str, opt("CLIP model: directory or hub id.", "MODEL")] = "openai/clip-vit-base-patch32",
    dino: Annotated[str, opt("DINO model: directory or hub id.", "MODEL")] = "facebook/dino-vits16",
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
):
    """Train, sample and score CustomConcept101 concepts; write CSV, JSON and a Figure-7 plot."""
    from persres.eval.runs import bench_customconcept101

    with BarReporter("bench", "prompts", enabled=os.environ.get("RANK", "0") == "0") as reporter:  # launched: rank 0 draws
        report = bench_customconcept101(registry(), root=root, concepts=concepts, concept=tuple(concept), multiconcept=multiconcept,
                                        samples_per_prompt=samples_per_prompt, prompts_per_concept=prompts_per_concept, lag=lag, out=out_dir,
                                        model=model, steps=steps, guidance=guidance, train_steps=train_steps, clip=clip, dino=dino,
                                        device=device, precision=precision, reporter=reporter)
    if report is None:  # another process than rank 0: rank 0 reports
        return
    out.print(scores_table("CustomConcept101", report.rows))
    out.print(scores_table("overall", [{"concept": "all", "method": k, **v} for k, v in report.summary["overall"].items()]))
    _written(report)


TOY_KEYS = ("identity", "drawn", "background", "added", "attribute", "delta_e", "within_20", "shape", "both_present", "own_minus_other",
            "own_minus_other_2", "nearer_own", "nearer_own_2", "delta_e_2", "right_class")


@bench_app.command("toy", cls=Command)
@command
def bench_toy(
    quick: Annotated[bool, typer.Option("--quick", help="Fewer prompts, 2 samples, one seed (a few minutes on a CPU).")] = False,
    concept: Annotated[list[str], opt("A shipped toy concept [default: every concept of --set].", "NAME", "--concept")] = [],
    concept_set: Annotated[list[str], opt("tuning, tuning_2, held_out or held_out_colors [default: all].", "SET", "--set")] = [],
    out_dir: Annotated[Path, opt("Output folder.", "DIR", "--out")] = Path("bench-toy"),
    model: ModelOption = None,
    steps: Annotated[int, opt("DDIM steps (paper: 50).", "INTEGER")] = 50,
    guidance: Annotated[float, opt("Guidance scale (paper: 6.0).", "FLOAT")] = 6.0,
    samples: Annotated[Optional[int], opt("Images per prompt and seed [default: 8; 2 with --quick].", "INTEGER")] = None,
    seeds: Annotated[Optional[int], opt("Seeds per prompt [default: 2; 1 with --quick].", "INTEGER")] = None,
    singles: Annotated[bool, typer.Option("--singles/--no-singles", help="The one-concept categories.")] = True,
    pairs: Annotated[bool, typer.Option("--pairs/--no-pairs", help="Two concepts in one prompt.")] = True,
    category: Annotated[list[str], opt("Only these one-concept categories (identity, background, add_object, attribute).", "CATEGORY",
                                        "--category")] = [],
    pair_method: Annotated[list[str], opt("Only these two-concept methods (base, summed, lag).", "METHOD", "--pair-method")] = [],
    train_steps: Annotated[Optional[int], opt("Training steps [default: the model's recommendation].", "INTEGER")] = None,
    lr: Annotated[Optional[float], opt("Learning rate [default: the model's recommendation].", "FLOAT")] = None,
    lr_schedule: Annotated[Optional[str], opt("constant or cosine [default: the model's recommendation].", "SCHEDULE")] = None,
    snr_gamma: Annotated[Optional[float], opt("Min-SNR-γ loss weights [default: the model's recommendation].", "FLOAT")] = None,
    init: Annotated[Optional[str], opt("Factor init: zero or random [default: the model's recommendation].", "INIT")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Flipped copies of the references [default: the model's recommendation].")] = None,
    prompt: Annotated[Optional[str], opt("Training prompt template [default: the model's recommendation].", "TEXT")] = None,
    rank_ratio: Annotated[Optional[float], opt("Rank as a fraction of channels [default: the model's recommendation].", "FLOAT")] = None,
    scale_min: Annotated[Optional[float], opt("Zoom-out views down to this scale, 1 = off [default: the model's recommendation].", "FLOAT")] = None,
    strength: Annotated[float, opt("Every concept's residual scaled by this when sampling, 0-2 (as gen -c NAME:S).", "FLOAT")] = 1.0,
    lag_tokens: Annotated[Optional[str], opt("Several concepts: region tokens, identifier+class, class or identifier.", "TOKENS")] = None,
    lag_coverage: Annotated[Optional[float], opt("Several concepts: fraction of pixels in each mask (0.5: median).", "FLOAT")] = None,
    lag_maps: Annotated[Optional[str], opt("Several concepts: block (each block's own) or aggregate (previous evaluation's, all blocks).",
                                            "MAPS")] = None,
    lag_delay: Annotated[Optional[float], opt("Several concepts: fraction of steps the base model runs alone first.", "FLOAT")] = None,
    lag_conflict: Annotated[Optional[str], opt("Several concepts: where masks overlap, normalized (max-normalized map) or raw (attention) wins.",
                                                "RULE")] = None,
    precision: Annotated[str, opt("auto, fp32 or bf16: training and sampling.", "PRECISION")] = "auto",
    class_words: Annotated[str, opt("given (each concept's true shape) or suggested (what `train --class auto` picks; prompts use it).",
                                     "WHICH", "--class-words")] = "given",
):
    """Train the toy concepts and score identity, color fidelity (Lab ΔE), shape, background, added objects, attributes and concept pairs, with and without LAG."""
    from rich.table import Column, Table

    from persres.eval.runs import bench_toy as run

    with StatusReporter("toy bench...") as reporter:
        report = run(registry(), quick=quick, concept=tuple(concept), concept_set=tuple(concept_set), out=out_dir, model=model, steps=steps,
                     guidance=guidance, samples=samples, seeds=seeds, singles=singles, pairs=pairs, category=tuple(category),
                     pair_method=tuple(pair_method), strength=strength, precision=precision, class_words=class_words, reporter=reporter,
                     train={"steps": train_steps, "lr": lr, "lr_schedule": lr_schedule, "snr_gamma": snr_gamma, "init": init, "flip": flip,
                            "prompt": prompt, "rank_ratio": rank_ratio, "scale_min": scale_min},
                     multi={"tokens": lag_tokens, "coverage": lag_coverage, "maps": lag_maps, "delay": lag_delay, "conflict": lag_conflict})
    keys = [k for k in TOY_KEYS if any(k in r for r in report.summary)]
    table = Table(*(Column(h, no_wrap=True) for h in ("set", "category", "method", "n", *keys)),
                  title=f"toy bench ({'quick' if quick else 'full'}; mean ± 95% interval)")
    for r in report.summary:
        table.add_row(r["set"], r["category"], r["method"], str(r["n"]), *(f"{r[k]:.2f}±{r[k + '_ci']:.2f}" if k in r else "" for k in keys))
    Console(width=max(out.width, 200)).print(table)  # never squeezed into a pipe's 80 columns
    _written(report)
