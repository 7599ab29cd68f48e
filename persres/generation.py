"""From a user's prompt to files: placeholders bound to concepts, PNGs that say how they were made.

`bind_prompt` expands `V1`, `V*`, `<name>`, `<name:0.8>` (`persres.tokens`) against the
registry; `write_images` writes a `sample.Generated` as PNGs with generation metadata, each
concept's LAG region tinted over its image, and optionally one contact sheet of the call.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from persres.version import __version__
from persres.config import SampleConfig
from persres.tokens import BoundConcept, PromptWarning, expand_prompt, split_concept_option, unbound_placeholders

MASK_COLORS = [(0, 220, 255), (255, 0, 200), (255, 230, 0), (0, 230, 90), (255, 120, 0)]  # cyan first: visible on most objects


def bind_prompt(prompt: str, concept_names: Sequence[str], registry) -> tuple[str, list[BoundConcept]]:
    """The prompt with identifiers in place of placeholders, and its concepts; a -c value may
    carry a strength ("name:0.8")."""
    given = []
    for option in concept_names:
        name, strength = split_concept_option(option)
        given.append(dataclasses.replace(registry.get(name).bound(), strength=strength))
    expanded, bound = expand_prompt(prompt, given, lambda n: registry.get(n).bound())
    loose = unbound_placeholders(prompt, bound)
    if loose:  # a typo far more often than intended text: said, and the image still made
        words = ", ".join(repr(w) for w in dict.fromkeys(loose))
        warnings.warn(f"{words} in the prompt binds to no concept and goes to the model as text "
                      f"(concept placeholders are <name>, <name:0.8>, or V1, V2, ... with -c)", PromptWarning, stacklevel=2)
    return expanded, bound


def generation_metadata(prompt: str, expanded: str, seed: int, concepts: Sequence[BoundConcept], config: SampleConfig, model: str) -> dict:
    """What a generated PNG carries, so that an image says how it was made."""
    return {
        "prompt": prompt, "expanded_prompt": expanded, "seed": seed,
        "concepts": ",".join(c.name for c in concepts), "identifiers": ",".join(c.identifier for c in concepts),
        "strengths": ",".join(f"{c.strength:g}" for c in concepts),
        "lag": config.lag, "steps": config.steps, "guidance": config.guidance, "eta": config.eta,
        "model": model, "persres_version": __version__,
    }


def mask_overlay(image: Image.Image, mask: np.ndarray, color_index: int = 0) -> Image.Image:
    """The image with the concept's region tinted: where the residual acted."""
    color = np.array(MASK_COLORS[color_index % len(MASK_COLORS)], dtype=np.float32)
    m = Image.fromarray((mask * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    alpha = np.asarray(m, dtype=np.float32)[..., None] / 255 * 0.55
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + color * alpha).round().astype(np.uint8))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "image"


def file_stem(prompt: str, concepts: Sequence[BoundConcept], config: SampleConfig) -> str:
    """What made the images, in their names: "a-v-circle-on-green-checker-lag", "...-checker0.7+heart-nolag",
    "...-base" without concepts (strengths other than 1 written after the name)."""
    made_by = "+".join(c.name + ("" if c.strength == 1 else f"{c.strength:g}") for c in concepts) or "base"
    return f"{_slug(prompt)}-{made_by}" + ("" if not concepts else "-lag" if config.lag else "-nolag")


def free_path(path: Path, overwrite: bool = False) -> Path:
    """`path`, or with -2, -3, ... before its suffix where a file of that name exists (unless `overwrite`)."""
    if overwrite or not path.exists():
        return path
    k = 2
    while path.with_name(f"{path.stem}-{k}{path.suffix}").exists():
        k += 1
    return path.with_name(f"{path.stem}-{k}{path.suffix}")


def write_images(result, prompt: str, concepts: Sequence[BoundConcept], config: SampleConfig, model: str, out: Path,
                 sheet: bool = False, overwrite: bool = False) -> list[Path]:
    """The PNGs of one call (then each concept's region overlay per image, then the sheet); their paths.
    An existing file is never replaced unless `overwrite`: the new one takes the next free number."""
    from persres.images import contact_sheet, save_png

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    stem = file_stem(prompt, concepts, config)
    mask_rows: dict[str, list] = {}
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        path = free_path(out / f"{stem}-{seed}.png", overwrite)
        save_png(image, path, generation_metadata(prompt, result.prompt, seed, concepts, config, model))
        paths.append(path)
        for k, (name, per_image) in enumerate(result.masks.items()):
            overlay = mask_overlay(image, per_image[i], k)
            mask_path = path.with_name(f"{path.stem}.mask-{name}.png")
            overlay.save(mask_path)
            paths.append(mask_path)
            mask_rows.setdefault(name, []).append(overlay)
    if sheet:
        sheet_path = free_path(out / f"{stem}-sheet.png", overwrite)
        contact_sheet([result.images, *mask_rows.values()]).save(sheet_path)
        paths.append(sheet_path)
    return paths
