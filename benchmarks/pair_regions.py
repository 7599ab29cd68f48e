"""Where several concepts' LAG regions fall: for each tuning pair, the share of each object
(as the toy checker segments the final picture) that each concept's mask covered, averaged
over blocks and steps (the masks `--save-masks` writes).

    python -m benchmarks.pair_regions --out benchmarks/results/toy-pair-regions.json [--lag delay=0.5 maps=block]

Trains (or reuses, under --registry) the tuning concepts with the toy model's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image


def coverage(mask: np.ndarray, part: np.ndarray) -> float:
    """Mean of a (h, w) mask over an object's (H, W) pixels, resized to the mask's grid."""
    small = np.array(Image.fromarray(part.astype(np.uint8) * 255).resize(mask.shape[::-1], Image.Resampling.BILINEAR)) > 127
    return float(mask[small].mean()) if small.any() else float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--registry", type=Path, default=Path.home() / ".cache" / "persres-pair-regions")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--lag", nargs="*", default=[], metavar="KEY=VALUE", help="several-concept region choices over MultiLagConfig's defaults")
    args = ap.parse_args(argv)

    from benchmarks.toy_study import setting
    from persres.settings import train_config_for
    from persres.workspace import Workspace
    from persres.config import MultiLagConfig, SampleConfig
    from persres.models import load_pipeline, resolve_model
    from persres.registry import Registry
    from persres.sample import generate
    from persres.toy import checker, world
    from persres.toy.bench import pair_prompt, pairs_of, prepare_concepts

    model = resolve_model("toy")
    pipe = load_pipeline(model)
    config = train_config_for(model, {})
    loaded = prepare_concepts(Workspace(model, registry=Registry(args.registry), pipe=pipe), list(world.CONCEPT_SETS["tuning"]), config)
    multi = MultiLagConfig(**dict(setting(kv) for kv in args.lag))
    sample = SampleConfig(steps=args.steps, num_images=args.samples, seed=999, lag=True, save_masks=True, multi=multi)
    rows = []
    for a, b in pairs_of(loaded):
        left, right = loaded[a], loaded[b]
        _, expanded, used = pair_prompt(left, right)
        out = generate(pipe, expanded, used, sample)
        masks = [out.masks[left.bound.name], out.masks[right.bound.name]]
        cov = np.array([[[coverage(m[i], part) for m in masks] for part in checker.segment(im, 2)[2]]
                        for i, im in enumerate(out.images)])  # (image, object, concept)
        mean = np.nanmean(cov, axis=0)
        rows.append({"pair": f"{a}+{b}", "left_object": {"own": mean[0, 0], "other": mean[0, 1]},
                     "right_object": {"own": mean[1, 1], "other": mean[1, 0]}})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": model, "train": config.to_dict(), "samples": args.samples, "ddim_steps": args.steps,
            "multi_lag": dataclasses.asdict(sample.multi)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "pairs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
