"""Score a folder of generated images against a folder of reference images.

Prompts come from each PNG's own metadata (persres writes `expanded_prompt` and
`identifiers`) or from a prompts.json in CustomConcept101's format ({image stem: prompt}).
By default the concept identifiers are removed from the prompt text before CLIP-T
("a sks dog on the beach" is scored as "a dog on the beach"): the identifier is a rare
token that means nothing to CLIP, and the intent of the prompt is its class word and
scene. `keep_identifier=True` scores the text as sampled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from persres.errors import InputError
from persres.eval.metrics import Scorer, Scores, score
from persres.images import read_folder

SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tiff", ".JPG")


def strip_identifiers(prompt: str, identifiers: Iterable[str]) -> str:
    for ident in identifiers:
        if ident:
            prompt = re.sub(rf"(?<!\w){re.escape(ident)}(?!\w)", "", prompt)
    return re.sub(r"\s+", " ", prompt).replace(" .", ".").replace(" ,", ",").strip()


def sample_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"sample folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix in SAMPLE_SUFFIXES and ".mask-" not in p.name)
    if not files:
        raise InputError(f"sample folder {str(folder)!r} holds no images")
    return files


def prompts_for(files: list[Path], prompts_json: Path | None, keep_identifier: bool, strip: Iterable[str] = ()) -> list[str]:
    strip = list(strip)
    if prompts_json is not None:
        try:
            table = json.loads(Path(prompts_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read prompts file {str(prompts_json)!r}: {e}") from None
        missing = [f.stem for f in files if f.stem not in table]
        if missing:
            raise InputError(f"prompts file {str(prompts_json)!r} has no prompt for image {missing[0]!r}")
        return [table[f.stem] if keep_identifier else strip_identifiers(table[f.stem], strip) for f in files]
    prompts = []
    for f in files:
        with Image.open(f) as im:
            text = getattr(im, "text", {}) or {}
        if "expanded_prompt" not in text:
            raise InputError(f"{str(f)!r} carries no persres prompt metadata: pass --prompts prompts.json")
        idents = [i for i in text.get("identifiers", "").split(",") if i] + strip
        prompts.append(text["expanded_prompt"] if keep_identifier else strip_identifiers(text["expanded_prompt"], idents))
    return prompts


def load_images(files: list[Path]) -> list[Image.Image]:
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(im.convert("RGB"))
    return out


def eval_folder(
    samples: Path,
    reference_dirs: list[Path],
    scorer: Scorer,
    prompts_json: Path | None = None,
    keep_identifier: bool = False,
    strip: Iterable[str] = (),
) -> Scores:
    return score(scorer, *read_inputs(samples, reference_dirs, prompts_json, keep_identifier, strip))


def read_inputs(samples: Path, reference_dirs: list[Path], prompts_json: Path | None = None, keep_identifier: bool = False,
                strip: Iterable[str] = ()) -> tuple[list[Image.Image], list[str], list[list[Image.Image]]]:
    """(sample images, their prompts, each reference folder's images): every input read and checked."""
    files = sample_files(Path(samples))
    prompts = prompts_for(files, prompts_json, keep_identifier, strip)
    refs = [[r.image for r in read_folder(d)] for d in reference_dirs]
    return load_images(files), prompts, refs


def score_folder(samples: Path, refs: list[Path], clip: str, dino: str, device: str = "auto", prompts: Path | None = None,
                 keep_identifier: bool = False, strip: Iterable[str] = ()) -> Scores:
    """`persres eval`: read and check the inputs, then load the scorers on `device` and score one folder of samples."""
    from persres.models import pick_device

    inputs = read_inputs(samples, refs, prompts, keep_identifier, strip)  # a bad folder is one line before any scorer loads
    return score(Scorer(clip, dino, pick_device(device)), *inputs)
