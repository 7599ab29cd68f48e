"""`persres bench toy`: the method measured on the toy world, with the analytic checker.

Concepts come in two sets fixed before any tuning (`world.CONCEPT_SETS`): method choices
are tuned on "tuning" and reported on "held_out". For each concept: train (the model's
recommended defaults), then sample the prompt categories the paper analyses — identity,
change background, add object, change attribute — with the base model alone (no
residual), without LAG and with LAG, on the same seeds. Scores, per image:
- drawn: the checker counts as many objects as the prompt asks for (the concept's object was not
  dissolved, the added one not lost)
- identity: histogram intersection between the colors of the concept's object region and
  those of the reference images as the model's own VAE reconstructs them (a palette count
  misses a VAE-blurred checker; a color histogram does not)
- background: the checker's background color is the prompt's
- added object: the second object's color is the prompt's
- attribute: the object's dominant color is the prompt's
- color fidelity, as a person sees it: each object pixel's CIE Lab distance to the nearest
  color of the concept's references (`delta_e`: the median ΔE76 over the object's core,
  `delta_e2000`: the same with CIEDE2000, `within_20`: the share of pixels within ΔE76 20);
  the references themselves score 0, their round trip through the model's own VAE (method
  "vae") is what a decoder-bound residual can reach at best
- shape: the checker's best-matching shape template is the concept's shape
Two concepts in one prompt (consecutive pairs within a set, on a background far from both
concepts' colors): both objects present (the checker counts exactly two), and on each side
the own concept's identity minus the other's, the side's ΔE to its own concept's colors,
whether it is nearer its own concept's colors than the other's (`nearer_own`), for the base
model, both residuals summed into the weights, and LAG. A three-concept prompt (the set's
first three concepts of different shapes) is scored the same way, side by side.
Summaries are means with 95% intervals over images; identity lifts are paired (same seed,
same prompt) differences against the base model.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from persres.config import SampleConfig
from persres.images import contact_sheet
from persres.tokens import BoundConcept, expand_prompt
from persres.toy import CONCEPTS_DIR, checker, world

from persres.toy.scoring import (color_fidelity, color_histogram, pair_background, reference_lab, score_group,
                                 score_image, shape_match, side_suffix)


@dataclass(frozen=True)
class ToyPrompt:
    category: str
    text: str  # with V* (or V1/V2)
    background: str | None = None
    added: str | None = None  # color of the added object
    attribute: str | None = None  # color asked of the concept itself
    objects: int = 1


@dataclass(frozen=True)
class ToyBenchConfig:
    samples: int = 8  # images per prompt and seed
    seeds: tuple[int, ...] = (0, 1)
    quick: bool = False  # fewer prompts
    singles: bool = True  # the one-concept categories
    pairs: bool = True  # two concepts in one prompt
    categories: tuple[str, ...] | None = None  # one-concept categories to run (None: all)
    pair_methods: tuple[str, ...] = ("base", "summed", "lag")
    sample: SampleConfig = field(default_factory=SampleConfig)
    strength: float = 1.0  # every concept's residual scaled by this when sampling (gen -c NAME:STRENGTH)


@dataclass
class BenchConcept:
    name: str  # the toy concept's name (the pack's name is `bound.name`)
    bound: BoundConcept
    shape: str
    concept_set: str
    ref_hist: np.ndarray
    ref_pixels: np.ndarray  # (N, 3) the references' object pixels, as rendered
    refs: list[Image.Image] = field(default_factory=list)  # the reference images
    vae_refs: list[Image.Image] = field(default_factory=list)  # the same through the model's VAE

    @cached_property
    def ref_lab(self) -> np.ndarray:
        """(M, 3) the distinct colors of the references' objects, in Lab (computed once per concept)."""
        return reference_lab(self.ref_pixels)


def prompts_for(shape: str, quick: bool, class_word: str | None = None) -> list[ToyPrompt]:
    """The prompts of one concept; `class_word` (default: the true shape) is what they call it."""
    other = "star" if shape != "star" else "cross"
    word = class_word or shape
    backgrounds = ("green", "red") if quick else ("green", "red", "yellow", "black")
    out = [ToyPrompt("identity", f"a photo of a V* {word}")]
    out += [ToyPrompt("background", f"a V* {word} on a {bg} background", background=bg) for bg in backgrounds]
    out += [ToyPrompt("add_object", f"a V* {word} and a {c} {other} on a white background", background="white", added=c, objects=2)
            for c in (("red",) if quick else ("red", "blue"))]
    out += [ToyPrompt("attribute", f"a {c} V* {word} on a white background", background="white", attribute=c)
            for c in (("blue",) if quick else ("blue", "green"))]
    return out


def vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """The images as the model's own VAE reconstructs them (the latent mean, decoded)."""
    from persres.images import to_pil, to_tensor

    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        x = torch.stack([to_tensor(im.convert("RGB").resize((side, side))) for im in images]).to(pipe.vae.device, pipe.vae.dtype)
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample  # (N, 3, H, W)
    return [to_pil(r) for r in rec]


def reference_histogram(pipe, images: list[Image.Image]) -> np.ndarray:
    """The references' object colors after the model's own VAE round trip."""
    return color_histogram(object_pixels(vae_round_trip(pipe, images)))


def object_pixels(images: list[Image.Image]) -> np.ndarray:
    out = []
    for im in images:
        img, _, parts = checker.segment(im, 1)
        out.append(img[parts[0]])
    return np.concatenate(out)


def grid(columns: dict[str, list[Image.Image]], scale: int = 3) -> Image.Image:
    """Columns side by side (e.g. no LAG | LAG), one row per sample, upscaled to be seen."""
    rows = [list(row) for row in zip(*columns.values())]
    return contact_sheet(rows, min_side=rows[0][0].width * scale)


def concept_set_of(name: str) -> str:
    return next((s for s, names in world.CONCEPT_SETS.items() if name in names), "other")


def select_concepts(names: Sequence[str] | None = None, sets: Sequence[str] | None = None) -> list[str]:
    """Shipped toy concepts by name, or every concept of the given sets (all by default)."""
    from persres.errors import InputError

    unknown_sets = [s for s in sets or () if s not in world.CONCEPT_SETS]
    if unknown_sets:
        raise InputError(f"unknown concept set {unknown_sets[0]!r} (choose from {', '.join(world.CONCEPT_SETS)})")
    if names:
        unknown = [n for n in names if n not in world.NOVEL_CONCEPTS]
        if unknown:
            raise InputError(f"unknown toy concept {unknown[0]!r} (choose from {', '.join(world.NOVEL_CONCEPTS)})")
        return list(dict.fromkeys(names))
    return [n for s in (sets or world.CONCEPT_SETS) for n in world.CONCEPT_SETS[s]]


def prepare_concepts(ws, names: Sequence[str], config, class_words: str = "given") -> dict[str, BenchConcept]:
    """Train (or reuse) a pack per shipped concept, load them onto `pipe`, and compute the
    references' histograms: what `run_toy_bench` takes. `class_words="suggested"`: each pack's
    class word is what `persres train --class auto` picks (the model's class candidates, else the
    built-in nouns), not the shape."""
    if class_words not in ("given", "suggested"):
        from persres.errors import InputError

        raise InputError(f"--class-words must be given or suggested, got {class_words!r}")
    from persres.images import read_folder
    from persres.settings import digest_name

    weights = ws.base_weights()  # weights rebuilt at the same path: new packs
    pipe, loaded = ws.pipeline(), {}
    for name in names:
        pack = digest_name("toybench", name, config, ws.model, weights, "-suggested" if class_words == "suggested" else "")
        folder = CONCEPTS_DIR / name
        shape = world.NOVEL_CONCEPTS[name][0]
        if not ws.registry.has(pack):
            ws.train(folder, pack, shape if class_words == "given" else "auto", config=config)
        bound = ws.apply_concepts([pack])[0]
        refs = [r.image for r in read_folder(folder)]
        vae_refs = vae_round_trip(pipe, refs)  # once: the identity histogram (`reference_histogram`) and the "vae" rows
        loaded[name] = BenchConcept(name, bound, shape, concept_set_of(name), color_histogram(object_pixels(vae_refs)),
                                    object_pixels(refs), refs, vae_refs)
    return loaded


def pairs_of(concepts: dict[str, BenchConcept]) -> list[tuple[str, str]]:
    """Consecutive pairs (cyclic) within each set, of concepts with different shapes."""
    out = []
    for s in dict.fromkeys(c.concept_set for c in concepts.values()):
        names = [n for n, c in concepts.items() if c.concept_set == s]
        if len(names) < 2:
            continue
        for i, a in enumerate(names):
            b = names[(i + 1) % len(names)]
            if (b, a) not in out and (a, b) not in out and concepts[a].shape != concepts[b].shape:
                out.append((a, b))
    return out


def run_toy_bench(pipe, concepts: dict[str, BenchConcept], out: Path, cfg: ToyBenchConfig,
                  log: Callable[[str], None] = lambda m: None, meta: dict | None = None) -> list[dict]:
    """Per-image rows of every score; also writes results.csv/json and grid-*.png into `out`."""
    from persres.sample import generate

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    grids: dict[str, list[Image.Image]] = {}
    for name, concept in concepts.items() if cfg.singles else ():
        for k, prompt in enumerate(prompts_for(concept.shape, cfg.quick, concept.bound.class_word)):
            if cfg.categories is not None and prompt.category not in cfg.categories:
                continue
            bound = replace(concept.bound, strength=cfg.strength)
            expanded, used = expand_prompt(prompt.text, [bound], lambda n: bound)
            base_text = prompt.text.replace("V* ", "")
            for seed in cfg.seeds:
                sample = cfg.sample.replace(num_images=cfg.samples, seed=1000 * seed + 100 * k)
                images = {
                    "base": generate(pipe, base_text, [], sample).images,
                    "nolag": generate(pipe, expanded, used, sample.replace(lag=False)).images,
                    "lag": generate(pipe, expanded, used, sample.replace(lag=True)).images,
                }
                for method, ims in images.items():
                    for i, im in enumerate(ims):
                        rows.append({"set": concept.concept_set, "concept": name, "category": prompt.category,
                                     "prompt": prompt.text, "method": method, "seed": seed, "image": i,
                                     "class_word": concept.bound.class_word, "right_class": concept.bound.class_word == concept.shape,
                                     **score_image(im, prompt, concept.ref_hist, concept)})
                if seed == cfg.seeds[0]:
                    grids.setdefault(prompt.category, []).append(grid(images))
            log(f"{name}: {prompt.text}")
    for name, concept in concepts.items() if cfg.singles else ():
        rows += reference_rows(concept)
    if cfg.singles and concepts:
        references_sheet(concepts.values()).save(out / "references.png")
    for a, b in pairs_of(concepts) if cfg.pairs else ():
        rows += several_concepts(pipe, [concepts[a], concepts[b]], cfg, grids)
        log(f"{a} + {b}")
    for trio in triples_of(concepts) if cfg.pairs else ():
        rows += several_concepts(pipe, [concepts[n] for n in trio], cfg, grids)
        log(" + ".join(trio))
    for category, parts in grids.items():
        contact_sheet([[p] for p in parts], min_side=1, gap=6).save(out / f"grid-{category}.png")  # one prompt per band
    write_rows(out, rows, meta or {})
    return rows


def reference_rows(concept: BenchConcept) -> list[dict]:
    """The references themselves (ΔE 0 by construction) and their VAE round trip, scored as samples are."""
    rows = []
    for method, images in (("references", concept.refs), ("vae", concept.vae_refs)):
        for i, im in enumerate(images):
            rows.append({"set": concept.concept_set, "concept": concept.name, "category": "references", "prompt": "", "method": method,
                         "seed": 0, "image": i, **color_fidelity(im, concept.ref_lab), "shape": shape_match(im, concept.shape)})
    return rows


def references_sheet(concepts) -> Image.Image:
    """One band per concept: its references, then the same through the model's VAE."""
    return contact_sheet([[*c.refs, *c.vae_refs] for c in concepts], min_side=96)


def triples_of(concepts: dict[str, BenchConcept]) -> list[tuple[str, str, str]]:
    """Per set, its first three concepts of three different shapes (one three-concept prompt)."""
    out = []
    for s in dict.fromkeys(c.concept_set for c in concepts.values()):
        trio: list[str] = []
        for n, c in concepts.items():
            if c.concept_set == s and len(trio) < 3 and c.shape not in {concepts[t].shape for t in trio}:
                trio.append(n)
        if len(trio) == 3:
            out.append(tuple(trio))
    return out


def pair_prompt(left: BenchConcept, right: BenchConcept) -> tuple[str, str, list[BoundConcept]]:
    """A pair's prompt (V1 left, V2 right, on a background far from both), its expansion and its concepts."""
    return group_prompt([left, right])


def group_prompt(concepts: Sequence[BenchConcept]) -> tuple[str, str, list[BoundConcept]]:
    """Several concepts' prompt (V1, V2, ... left to right, on a background far from all), its expansion and its concepts."""
    bg = pair_background(*(c.ref_pixels for c in concepts))
    text = " and ".join(f"a V{i + 1} {c.bound.class_word}" for i, c in enumerate(concepts)) + f" on a {bg} background"
    expanded, used = expand_prompt(text, [c.bound for c in concepts], lambda n: concepts[0].bound)
    return text, expanded, used


def several_concepts(pipe, concepts: Sequence[BenchConcept], cfg: ToyBenchConfig, grids) -> list[dict]:
    """A pair (category two_concepts) or a trio (three_concepts) in one prompt, for each pair method."""
    from persres.sample import generate

    text, expanded, used = group_prompt(concepts)
    used = [replace(c, strength=cfg.strength) for c in used]
    base_text = text
    for i in range(len(concepts)):
        base_text = base_text.replace(f"V{i + 1} ", "")
    category = {2: "two_concepts", 3: "three_concepts"}[len(concepts)]
    rows = []
    for seed in cfg.seeds:
        sample = cfg.sample.replace(num_images=cfg.samples, seed=1000 * seed + 999 - (len(concepts) - 2))
        runs = {"base": (base_text, [], sample), "summed": (expanded, used, sample.replace(lag=False)),
                "lag": (expanded, used, sample.replace(lag=True))}
        images = {method: generate(pipe, *runs[method]).images for method in cfg.pair_methods}
        for method, ims in images.items():
            for i, im in enumerate(ims):
                rows.append({"set": concepts[0].concept_set, "concept": "+".join(c.name for c in concepts), "category": category,
                             "prompt": text, "method": method, "seed": seed, "image": i, **score_group(im, concepts)})
        if seed == cfg.seeds[0]:
            grids.setdefault(category, []).append(grid(images))
    return rows


SIDE_METRICS = ("identity", "own_minus_other", "delta_e", "delta_e2000", "within_20", "nearer_own", "lab_margin", "shape")
METRICS = tuple(dict.fromkeys(("identity", "drawn", "background", "added", "attribute", "both_present", "right_class",
                                *(f"{k}{side_suffix(i)}" for i in range(3) for k in SIDE_METRICS))))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def summarize(rows: list[dict]) -> list[dict]:
    """Per (set, category, method): each score's mean and 95% interval, and the number of images.
    Plus paired identity lifts over the base model ("nolag-base", "lag-base")."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["category"], r["method"]), []).append(r)
    for (s, cat, method), sel in groups.items():
        entry = {"set": s, "category": cat, "method": method, "n": len(sel)}
        for k in METRICS:
            vals = [r[k] for r in sel if k in r]
            if vals:
                entry[k], entry[f"{k}_ci"] = mean_ci(vals)
        out.append(entry)
    base = {(r["set"], r["concept"], r["prompt"], r["seed"], r["image"]): r["identity"] for r in rows if r["method"] == "base"}
    for s, cat in dict.fromkeys((r["set"], r["category"]) for r in rows if r["category"] not in ("two_concepts", "three_concepts", "references")):
        for method in ("nolag", "lag"):
            diffs = [r["identity"] - base[key] for r in rows
                     if (r["set"], r["category"], r["method"]) == (s, cat, method)
                     and (key := (r["set"], r["concept"], r["prompt"], r["seed"], r["image"])) in base]
            if diffs:
                mean, ci = mean_ci(diffs)
                out.append({"set": s, "category": cat, "method": f"{method}-base", "n": len(diffs), "identity": mean, "identity_ci": ci})
    return out


def write_rows(out: Path, rows: list[dict], meta: dict) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summarize(rows)}, indent=2) + "\n")
