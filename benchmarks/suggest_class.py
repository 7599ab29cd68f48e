"""`persres suggest-class` on the toy world: accuracy, UNet evaluations and time against a training run.

    OMP_NUM_THREADS=1 python benchmarks/suggest_class.py --out benchmarks/results/suggest-class.json

For every shipped toy concept (a texture no caption names, on one of the six shapes), the
suggestion is scored against the true shape with two candidate lists: the six shapes alone
(class words, as the built-in list holds nouns) and the six shapes with the toy world's
colors and caption words as distractors (the harder test issue #15 asks for); and with both
scores (per-draw mean rank, mean error). Side by side: the time of a default training run of
the toy model (its recommended steps) on the same concept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from persres.api import train_config_for
    from persres.images import read_folder
    from persres.models import load_pipeline, resolve_model
    from persres.suggest import SuggestConfig, screen, suggest_class
    from persres.toy import world
    from persres.toy.bench import CONCEPTS_DIR
    from persres.train import train_residuals

    model = resolve_model("toy")
    pipe = load_pipeline(model)
    lists = {"shapes": list(world.SHAPES),
             "shapes + colors + caption words": [*world.SHAPES, *world.COLORS, "background", "photo"]}
    rows, timing = [], {}
    for name, (shape, _) in world.NOVEL_CONCEPTS.items():
        images = [r.image for r in read_folder(CONCEPTS_DIR / name)]
        for label, words in lists.items():
            kept, _ = screen(pipe.tokenizer, words)
            for score in ("rank", "error"):
                s = suggest_class(pipe, images, kept, SuggestConfig(seed=args.seed, score=score))
                rows.append({"concept": name, "shape": shape, "candidates": label, "score": score, "suggested": s.best,
                             "right": s.best == shape, "top3": [c for c, _, _ in s.ranking[:3]],
                             "evaluations": s.evaluations, "seconds": round(s.seconds, 2)})
                print(json.dumps(rows[-1]), flush=True)
        if "train" not in timing:
            config = train_config_for(model, {})
            t0 = time.perf_counter()
            train_residuals(pipe, images, "sks", shape, config)
            timing = {"train_steps": config.steps, "train_batch": config.batch_size,
                      "train_sample_forwards": config.steps * config.batch_size * 3, "train_seconds": round(time.perf_counter() - t0, 2)}
    summary = {}
    for label in lists:
        for score in ("rank", "error"):
            sel = [r for r in rows if r["candidates"] == label and r["score"] == score]
            summary[f"{label} / {score}"] = {"right": sum(r["right"] for r in sel), "of": len(sel),
                                             "mean_seconds": round(sum(r["seconds"] for r in sel) / len(sel), 2),
                                             "evaluations": max(r["evaluations"] for r in sel)}
    meta = {"model": model, "threads": torch.get_num_threads(), "seed": args.seed, **timing}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
