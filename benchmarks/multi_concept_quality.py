"""What the N-pass regional baseline buys in pictures: LAG (one pass) against one UNet pass per
concept blended by the same regions, on the toy world's held-out concepts.

    python -m benchmarks.multi_concept_quality --json benchmarks/results/toy-multi_concept_quality.json

Every held-out pair (`persres.toy.bench.pairs_of`) and one three-concept prompt, the same seeds
and initial noise for both methods (`--samples` images × `--seeds`), DDIM 25 steps, guidance 6.
Scores as `persres bench toy` scores pairs: every object present (the checker counts them),
identity (the reference colour histogram's overlap with each object) and own − other (each
object's identity minus its identity to the other concepts). Concepts are trained with the toy
model's defaults, once, under --registry.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def parts_of(image, k: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """(pixels, k object masks left to right) as the toy checker segments them; for three
    objects its three largest components (None where fewer are drawn)."""
    from persres.toy import checker

    img, background, parts = checker.segment(image, min(k, 2))
    if k <= 2:
        return img, list(parts)
    largest = [c for c in checker.components(checker.object_mask(img, background))[:k] if c.sum() >= 6]
    ordered = sorted(largest, key=lambda c: np.nonzero(c)[1].mean())
    return img, ordered + [None] * (k - len(ordered))


def score(image, concepts) -> dict:
    """All present, and per object (left to right) identity and own − other (mean over the others):
    the reference colour histogram's overlap with the object's pixels (0 for an object not drawn)."""
    from persres.toy.scoring import color_histogram, count_objects

    k = len(concepts)
    img, parts = parts_of(image, k)

    def overlap(part, concept) -> float:
        return 0.0 if part is None or not part.any() else float(np.minimum(color_histogram(img[part]), concept.ref_hist).sum())

    own = [overlap(parts[i], c) for i, c in enumerate(concepts)]
    other = [np.mean([overlap(parts[i], o) for j, o in enumerate(concepts) if j != i]) for i in range(k)]
    return {"all_present": float(count_objects(image) == k), "identity": float(np.mean(own)),
            "own_minus_other": float(np.mean([a - b for a, b in zip(own, other)]))}


def prompt_of(concepts) -> tuple[str, list]:
    """"a V1 x and a V2 y [and a V3 z] on a BG background" (BG far from every concept's colors), expanded."""
    from persres.tokens import expand_prompt
    from persres.toy.scoring import pair_background

    pixels = [c.ref_pixels for c in concepts]
    background = pair_background(np.concatenate(pixels[:-1]), pixels[-1])
    text = " and ".join(f"a V{i + 1} {c.bound.class_word}" for i, c in enumerate(concepts)) + f" on a {background} background"
    return expand_prompt(text, [c.bound for c in concepts], lambda n: concepts[0].bound)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, default=Path.home() / ".cache" / "persres-multi-concept")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from benchmarks.multi_concept_cost import NPass
    from persres.settings import train_config_for
    from persres.config import SampleConfig
    from persres.models import load_pipeline, resolve_model
    from persres.registry import Registry
    from persres.sample import generate
    from persres.sizes import native_side
    from persres.toy import world
    from persres.toy.bench import mean_ci, pairs_of, prepare_concepts
    from persres.workspace import Workspace

    model = resolve_model("toy")
    pipe = load_pipeline(model)
    config = train_config_for(model, {})
    names = list(world.CONCEPT_SETS["held_out"])
    loaded = prepare_concepts(Workspace(model, registry=Registry(args.registry), pipe=pipe), names, config)
    baseline = NPass(pipe)
    groups = [[loaded[a], loaded[b]] for a, b in pairs_of(loaded)] + [[loaded[n] for n in names[:3]]]
    sample = SampleConfig(steps=args.steps, guidance=6.0, lag=True)
    rows = []
    for group in groups:
        expanded, used = prompt_of(group)
        for seed in range(args.seeds):
            seeds = [1000 * seed + 999 + i for i in range(args.samples)]
            images = {"lag": generate(pipe, expanded, used, sample.replace(num_images=args.samples, seed=seeds[0])).images,
                      "n-pass": baseline.images(expanded, used, args.steps, native_side(pipe), seeds, guidance=6.0)}
            for method, ims in images.items():
                rows += [{"concepts": "+".join(c.name for c in group), "k": len(group), "method": method, **score(im, group)} for im in ims]
        print(json.dumps({"concepts": rows[-1]["concepts"]}), flush=True)
    summary = {}
    for k in sorted({r["k"] for r in rows}):
        for method in ("lag", "n-pass"):
            picked = [r for r in rows if r["k"] == k and r["method"] == method]
            summary[f"k={k} {method}"] = {m: [round(v, 3) for v in mean_ci([r[m] for r in picked])]
                                         for m in ("all_present", "identity", "own_minus_other")} | {"images": len(picked)}
    report = {"model": model, "concepts": names, "train": config.to_dict(), "samples": args.samples, "seeds": args.seeds,
              "ddim_steps": args.steps, "guidance": 6.0, "summary (mean, 95% half-width)": summary, "rows": rows}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
