"""`persres suggest-class`: the base model ranks candidate class words for a folder of images."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from persres.cli.app import _model, _registry, app, command, err, out


def describe(suggestion) -> str:
    """'dog (runner-up cat, error 0.1023 vs 0.1051)': the pick, in one line."""
    (best, e0, _), *rest = suggestion.ranking
    if not rest:
        return best
    second, e1, _ = rest[0]
    return f"{best} (runner-up {second}; mean error {e0:.4f} vs {e1:.4f})"


@app.command("suggest-class")
@command
def suggest_class_command(
    images_dir: str = typer.Argument(..., help="Folder of photos of one thing, or toy:NAME."),
    model: Optional[str] = typer.Option(None, help="Diffusers directory, .safetensors/.ckpt checkpoint, hub id, or 'toy'."),
    model_config: Optional[str] = typer.Option(None, "--config", help="Diffusers directory with the configs of a single-file --model."),
    candidates: Optional[str] = typer.Option(None, help="a,b,c or a file with one word per line [default: the built-in list]."),
    top: int = typer.Option(5, help="How many to show."),
    seed: int = typer.Option(0, help="Seed of the shared (image, t, noise) draws."),
    budget: int = typer.Option(1800, help="UNet sample-forwards to spend at most (1800: a default training run)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Suggest the class word: the candidate under which the base model denoises your images best."""
    from persres.api import suggest_class_for
    from persres.images import resolve_folder
    from persres.suggest import SuggestConfig

    config = SuggestConfig(budget=budget, seed=seed, top=top)
    registry = _registry()
    resolved = _model(registry, model, model_config)
    with err.status("asking the model (successive halving over the candidates)..."):
        suggestion = suggest_class_for(resolve_folder(images_dir), model=resolved, candidates=candidates, config=config,
                                       registry=registry, model_config=model_config)
    for entry, why in suggestion.rejected:
        err.print(f"note: left out candidate {entry!r}: {why}", markup=False)
    if as_json:
        print(json.dumps({"suggestion": suggestion.best, "top": suggestion.top(top), "evaluations": suggestion.evaluations,
                          "seconds": round(suggestion.seconds, 2), "rejected": suggestion.rejected}, indent=2))
        return
    table = Table("rank", "class", "mean error", "margin over next", "draws",
                  title=f"class suggestions ({suggestion.evaluations} UNet evaluations, {suggestion.seconds:.1f}s)")
    shown = suggestion.ranking[:top]
    for i, (word, error, draws) in enumerate(shown):
        following = suggestion.ranking[i + 1][1] if i + 1 < len(suggestion.ranking) else None
        table.add_row(str(i + 1), word, f"{error:.5f}", "" if following is None else f"{following - error:+.5f}", str(draws))
    out.print(table)
    out.print(f"suggested class: {describe(suggestion)}", markup=False, highlight=False)
