"""How far the toy model's own VAE moves each concept's colors: the references encoded and
decoded (latent mean), scored by the toy bench's Lab measure. A residual on the UNet cannot
bring a concept's colors closer than its decoder draws them.

    python -m benchmarks.toy_vae_colors --json benchmarks/results/toy-vae-colors.json

Per concept: median over its references of the object's median ΔE76 (and CIEDE2000) to the
nearest reference color, and the share of object pixels within ΔE76 20; per set, the mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="default: the shipped toy model")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from persres.images import read_folder
    from persres.models import load_pipeline
    from persres.toy import CONCEPTS_DIR, world
    from persres.toy.bench import object_pixels, vae_round_trip
    from persres.toy.scoring import color_fidelity, reference_lab

    pipe = load_pipeline(args.model or "toy")
    concepts, sets = {}, {}
    for set_name, names in world.CONCEPT_SETS.items():
        for name in names:
            refs = [r.image for r in read_folder(CONCEPTS_DIR / name)]
            lab = reference_lab(object_pixels(refs))
            scores = [color_fidelity(im, lab) for im in vae_round_trip(pipe, refs)]
            scores = [s for s in scores if s]
            concepts[name] = {"set": set_name, "references": len(refs), "scored": len(scores),
                              **{k: round(statistics.median(s[k] for s in scores), 2) for k in ("delta_e", "delta_e2000", "within_20")}}
        mine = [concepts[n] for n in names]
        sets[set_name] = {k: round(statistics.mean(c[k] for c in mine), 2) for k in ("delta_e", "delta_e2000", "within_20")}
    report = {"model": args.model or "toy (shipped)", "per_set_mean": sets, "per_concept": concepts}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
