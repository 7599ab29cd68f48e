"""`persres bench toy`: the method measured on the toy world, with the analytic checker.

For each shipped novel concept: train (the model's recommended defaults), then sample the
prompt categories the paper analyses — identity, change background, add object, change
attribute — without LAG, with LAG, and with the base model alone (no residual), on the
same seeds. Scores:
- identity: histogram intersection between the colors of the concept's object region and
  those of the reference images as the model's own VAE reconstructs them (a palette count
  misses a VAE-blurred checker; a color histogram does not)
- background: the checker's background color is the prompt's
- added object: the second object's color is the prompt's
- attribute: the object's dominant color is the prompt's
Two concepts in one prompt: each side's identity against its own concept and against the
other (bleeding), with LAG and with both residuals summed into the weights.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from persres.config import SampleConfig
from persres.images import contact_sheet
from persres.tokens import BoundConcept, expand_prompt
from persres.toy import checker, world

BINS = 4  # per channel: 64 color bins
CONCEPTS_DIR = Path(__file__).parent / "concepts"  # the shipped reference folders


@dataclass(frozen=True)
class ToyPrompt:
    category: str
    text: str  # with V* (or V1/V2)
    background: str | None = None
    added: str | None = None  # color of the added object
    attribute: str | None = None  # color asked of the concept itself
    objects: int = 1


def prompts_for(shape: str, quick: bool) -> list[ToyPrompt]:
    other = "star" if shape != "star" else "cross"
    backgrounds = ("green", "red") if quick else ("green", "red", "yellow", "black")
    out = [ToyPrompt("identity", f"a photo of a V* {shape}")]
    out += [ToyPrompt("background", f"a V* {shape} on a {bg} background", background=bg) for bg in backgrounds]
    out += [ToyPrompt("add_object", f"a V* {shape} and a {c} {other} on a white background", background="white", added=c, objects=2)
            for c in (("red",) if quick else ("red", "blue"))]
    out += [ToyPrompt("attribute", f"a {c} V* {shape} on a white background", background="white", attribute=c)
            for c in (("blue",) if quick else ("blue", "green"))]
    return out


def color_histogram(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) uint8-range pixels -> normalized (BINS**3,) histogram."""
    if len(pixels) == 0:
        return np.zeros(BINS**3)
    q = np.clip(pixels.astype(np.int64) * BINS // 256, 0, BINS - 1)
    idx = q[:, 0] * BINS * BINS + q[:, 1] * BINS + q[:, 2]
    hist = np.bincount(idx, minlength=BINS**3).astype(np.float64)
    return hist / hist.sum()


def identity(image: Image.Image, reference_hist: np.ndarray, objects: int = 1, which: int = 0) -> float:
    img, _, parts = checker.segment(image, objects)
    hist = color_histogram(img[parts[which]])
    return float(np.minimum(hist, reference_hist).sum())


def reference_histogram(pipe, images: list[Image.Image]) -> np.ndarray:
    """The references' object colors after the model's own VAE round trip."""
    from persres.images import to_pil, to_tensor

    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        x = torch.stack([to_tensor(im.convert("RGB").resize((side, side))) for im in images]).to(pipe.vae.device, pipe.vae.dtype)
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    pixels = []
    for r in rec:
        img, _, parts = checker.segment(to_pil(r), 1)
        pixels.append(img[parts[0]])
    return color_histogram(np.concatenate(pixels))


def score_image(image: Image.Image, prompt: ToyPrompt, ref_hist: np.ndarray) -> dict:
    reading = checker.read(image, prompt.objects)
    row = {"identity": identity(image, ref_hist, prompt.objects)}
    if prompt.background is not None:
        row["background"] = float(reading.background == prompt.background)
    if prompt.added is not None:
        row["added"] = float(reading.colors[1] == prompt.added)
    if prompt.attribute is not None:
        row["attribute"] = float(reading.colors[0] == prompt.attribute)
    return row


def grid(columns: dict[str, list[Image.Image]], scale: int = 3) -> Image.Image:
    """Columns side by side (e.g. no LAG | LAG), one row per sample, upscaled to be seen."""
    rows = [list(row) for row in zip(*columns.values())]
    return contact_sheet(rows, min_side=rows[0][0].width * scale)


def mean_rows(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def select_concepts(names: list[str] | None) -> list[str]:
    """The shipped toy concepts asked for (all by default); an unknown name is an error."""
    from persres.errors import InputError

    names = names or list(world.NOVEL_CONCEPTS)
    unknown = [n for n in names if n not in world.NOVEL_CONCEPTS]
    if unknown:
        raise InputError(f"unknown toy concept {unknown[0]!r} (choose from {', '.join(world.NOVEL_CONCEPTS)})")
    return names


def prepare_concepts(pipe, names: list[str] | None, registry, model: str, config) -> dict[str, tuple[BoundConcept, np.ndarray]]:
    """Train (or reuse) a pack per shipped concept, load them onto `pipe`, and compute the
    references' histograms: what `run_toy_bench` takes."""
    from persres.api import apply_concepts, config_digest, train_concept
    from persres.images import read_folder

    loaded = {}
    for name in select_concepts(names):
        pack = f"toybench-{name}-{config_digest(config, model)}"
        folder = CONCEPTS_DIR / name
        if not registry.has(pack):
            train_concept(folder, pack, world.NOVEL_CONCEPTS[name][0], model=model, config=config, registry=registry, pipe=pipe)
        bound = apply_concepts(pipe, [pack], registry, model)[0]
        loaded[name] = (bound, reference_histogram(pipe, [r.image for r in read_folder(folder)]))
    return loaded


def run_toy_bench(pipe, concepts: dict[str, tuple[BoundConcept, np.ndarray]], out: Path, quick: bool, sample: SampleConfig,
                  log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """`concepts`: name -> (bound concept already loaded on pipe, reference histogram)."""
    from persres.sample import generate

    out.mkdir(parents=True, exist_ok=True)
    samples = 2 if quick else 8
    rows: list[dict] = []
    grids: dict[str, list[Image.Image]] = {}
    for name, (concept, ref_hist) in concepts.items():
        shape = world.NOVEL_CONCEPTS[name][0] if name in world.NOVEL_CONCEPTS else concept.class_word
        for k, prompt in enumerate(prompts_for(shape, quick)):
            expanded, used = expand_prompt(prompt.text, [concept], lambda n: concept)
            base_text = prompt.text.replace("V* ", "")
            cfg = sample.replace(num_images=samples, seed=100 * k)
            images = {
                "base": generate(pipe, base_text, [], cfg).images,
                "nolag": generate(pipe, expanded, used, cfg.replace(lag=False)).images,
                "lag": generate(pipe, expanded, used, cfg.replace(lag=True)).images,
            }
            for method, ims in images.items():
                per = [score_image(im, prompt, ref_hist) for im in ims]
                rows.append({"concept": name, "category": prompt.category, "prompt": prompt.text, "method": method,
                             **mean_rows(per, ("identity", "background", "added", "attribute"))})
            grids.setdefault(prompt.category, []).append(grid({"no LAG": images["nolag"], "LAG": images["lag"]}))
            log(f"{name}: {prompt.text}")
    names = list(concepts)
    if len(names) >= 2:
        rows += multi_concept(pipe, concepts, names[0], names[1], sample.replace(num_images=samples, seed=999), grids)
    for category, parts in grids.items():
        contact_sheet([[p] for p in parts], min_side=1, gap=6).save(out / f"grid-{category}.png")  # one prompt per band
    write_rows(out, rows)
    return rows


def multi_concept(pipe, concepts, first: str, second: str, cfg: SampleConfig, grids) -> list[dict]:
    from persres.sample import generate

    (c1, h1), (c2, h2) = concepts[first], concepts[second]
    s1 = world.NOVEL_CONCEPTS.get(first, (c1.class_word,))[0]
    s2 = world.NOVEL_CONCEPTS.get(second, (c2.class_word,))[0]
    text = f"a V1 {s1} and a V2 {s2} on a white background"
    expanded, used = expand_prompt(text, [c1, c2], lambda n: c1)
    rows, images = [], {}
    for method, lag in (("nolag", False), ("lag", True)):
        ims = generate(pipe, expanded, used, cfg.replace(lag=lag)).images
        images[method] = ims
        per = [{"identity": identity(im, h1, 2, 0), "identity_2": identity(im, h2, 2, 1),
                "bleed": identity(im, h2, 2, 0), "bleed_2": identity(im, h1, 2, 1)} for im in ims]
        rows.append({"concept": f"{first}+{second}", "category": "two_concepts", "prompt": text, "method": method,
                     **mean_rows(per, ("identity", "identity_2", "bleed", "bleed_2"))})
    grids.setdefault("two_concepts", []).append(grid({"summed (no LAG)": images["nolag"], "LAG": images["lag"]}))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean of each score per (category, method) over concepts and prompts."""
    keys = ("identity", "background", "added", "attribute", "identity_2", "bleed", "bleed_2")
    out = []
    for cat in dict.fromkeys(r["category"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["category"] == cat):
            sel = [r for r in rows if r["category"] == cat and r["method"] == method]
            out.append({"category": cat, "method": method, **mean_rows(sel, keys)})
    return out


def write_rows(out: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summarize(rows)}, indent=2) + "\n")
