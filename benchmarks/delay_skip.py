"""What skipping the residuals during LAG's several-concept delay saves: the time spent inside
the concepts' low-rank factors, per UNet evaluation, beside the evaluation itself.

    python -m benchmarks.delay_skip --json benchmarks/results/cpu-delay_skip.json

SD v1.4's architecture with random weights, default precision, 128 px, DDIM 20 steps, CFG,
k = 4 concepts with LAG. Forward hooks on every concept's factors (`LowRankResidual`) time
each call; a UNet pre-hook starts each evaluation's clock. The delayed evaluations (the first
20%) run no factor at all; every later one runs 4 concepts × 16 blocks of them, so the saving
is (delayed evaluations) × (factor time of an acting evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from benchmarks.multi_concept_cost import CONCEPTS, prompt_for
    from persres import residuals
    from persres.config import SampleConfig
    from persres.models import pick_dtype
    from persres.sample import generate
    from persres.testing import SD14_UNET_CONFIG, sd14_random_pipeline
    from persres.tokens import BoundConcept

    dtype = pick_dtype("auto", torch.device("cpu"), SD14_UNET_CONFIG)
    pipe = sd14_random_pipeline(dtype=dtype)
    concepts = [BoundConcept(name, ident, word) for name, ident, word in CONCEPTS]
    for i, c in enumerate(concepts):
        residuals.new_concept(pipe.unet, c.name, residuals.ranks_for(pipe.unet), init="random", seed=i)
    evaluations: list[dict] = []  # per evaluation: start, factor seconds, factor calls
    started: dict[int, float] = {}

    def pre(module, inputs):
        started[id(module)] = time.perf_counter()

    def post(module, inputs, output):
        evaluations[-1]["factor_s"] += time.perf_counter() - started.pop(id(module))
        evaluations[-1]["calls"] += 1

    hooks = [f.register_forward_pre_hook(pre) for layer in residuals.layers_of(pipe.unet).values() for f in layer.residuals.values()]
    hooks += [f.register_forward_hook(post) for layer in residuals.layers_of(pipe.unet).values() for f in layer.residuals.values()]
    hooks.append(pipe.unet.register_forward_pre_hook(lambda m, a: evaluations.append({"start": time.perf_counter(), "factor_s": 0.0, "calls": 0})))
    cfg = SampleConfig(steps=args.steps, height=args.resolution, width=args.resolution, guidance=7.5, lag=True)
    with torch.inference_mode():
        generate(pipe, prompt_for(4), concepts, cfg.replace(steps=5))  # warm-up
        evaluations.clear()
        generate(pipe, prompt_for(4), concepts, cfg)
    for h in hooks:
        h.remove()
    lengths = [b["start"] - a["start"] for a, b in zip(evaluations, evaluations[1:])]  # the last has no successor
    delayed = [e for e in evaluations if e["calls"] == 0]
    acting = [e for e in evaluations if e["calls"]]
    factor_s = statistics.median(e["factor_s"] for e in acting)
    evaluation_s = statistics.median(lengths)
    report = {"machine": machine(), "precision": str(dtype).removeprefix("torch."), "resolution": args.resolution, "steps": args.steps,
              "concepts": 4, "delayed evaluations": len(delayed), "factor calls per acting evaluation": acting[0]["calls"],
              "factor seconds per acting evaluation": round(factor_s, 4), "seconds per evaluation": round(evaluation_s, 4),
              "factor share of an acting evaluation": round(factor_s / evaluation_s, 4),
              "saved per image (s)": round(len(delayed) * factor_s, 3),
              "saved share of the generation's steps": round(len(delayed) * factor_s / sum(lengths), 4)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
