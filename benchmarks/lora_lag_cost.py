"""Four imported community LoRAs in one picture: what each way of composing them costs per step.

    python -m benchmarks.lora_lag_cost --side 128 --repeats 3 --json benchmarks/results/cpu-lora_lag_cost-128.json

SD v1.4's architecture with random weights (the cost, not the picture), DDIM 20 steps, CFG (one
batched UNet evaluation of [uncond, cond] per pass). Four LoRAs as kohya's default LoRA trains
them (rank 16 on every transformer block's attention q/k/v/out, feed-forward, proj_in and
proj_out), written as kohya files and imported by persres (`persres.interop.lora`), composed by
the four methods of `benchmarks.lora_compose`: summed, LAG, n-pass and two-phase (a 5-step
pre-pass, as FreeFuse runs 5 of 28). Plain is the same loop on the untouched UNet.

Per-step time: from the first UNet evaluation to the end of the last step, over the steps (text
encoding, merging the summed LoRAs into the weights and decoding left out). Each
run follows a plain run of its own; its ratio to that run is its cost, the median over --repeats
(drift on a shared machine cancels within a pair).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine

CONCEPTS = (("dog", "sks", "dog"), ("cat", "zwx", "cat"), ("vase", "qrv", "vase"), ("chair", "vfx", "chair"))
KOHYA_DEFAULT = (".attn1.", ".attn2.", ".ff.", ".proj_in", ".proj_out")  # sd-scripts' LoRA: the Transformer2DModel's Linear/Conv


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="summed,lag,n-pass,two-phase")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from benchmarks.lora_compose import Composer
    from persres import layers
    from persres.interop.lora import foreign_pack_tensors
    from persres.testing import sd14_random_pipeline
    from persres.testing.loras import random_lora
    from persres.tokens import BoundConcept

    pipe = sd14_random_pipeline()
    concepts = [BoundConcept(name, ident, word) for name, ident, word in CONCEPTS]
    where = lambda key: key.startswith("unet.") and any(s in key for s in KOHYA_DEFAULT)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(concepts):
            path = Path(tmp) / f"{c.name}.safetensors"
            random_lora(pipe, path, where=where, rank=args.rank, seed=i, scale=0.02)
            tensors, _, kept, _ = foreign_pack_tensors(path, pipe)
            layers.load_layers(pipe, c.name, tensors, kept)
    held = len(kept)
    composer = Composer(pipe)
    prompt = "a photo of " + " and ".join(f"a {c.identifier} {c.class_word}" for c in concepts) + " in a garden"

    def timed(method: str | None, steps: int) -> tuple[float, int]:
        composer.evaluations = 0
        with torch.inference_mode():
            if method is None:  # plain: the same loop, no LoRA acting
                composer.latents("summed", prompt, [], steps, args.side, [0])
            else:
                composer.latents(method, prompt, concepts, steps, args.side, [0])
        return (time.perf_counter() - composer.first_evaluation) / steps, composer.evaluations

    methods = args.methods.split(",")
    seconds: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    evaluations: dict[str, int] = {}
    for rep in range(args.repeats + 1):  # round 0 warms up, 5 steps each
        steps = args.steps if rep else 5
        for method in methods:
            plain_s, evaluations["plain"] = timed(None, steps)
            s, evaluations[method] = timed(method, steps)
            if rep:
                seconds.setdefault("plain", []).append(plain_s)
                seconds.setdefault(method, []).append(s)
                ratios.setdefault(method, []).append(s / plain_s)
                print(f"{method}: {s:.3f} s/step ({s / plain_s:.3f}x the plain run before it), {evaluations[method]} UNet evaluations",
                      flush=True)
        report = {"machine": machine(), "side": args.side, "steps": args.steps, "rank": args.rank, "layers per LoRA": held,
                  "loras": len(concepts), "seconds per step": {n: round(statistics.median(v), 4) for n, v in seconds.items()},
                  "UNet evaluations per image": evaluations,
                  "relative to plain (median of paired ratios)": {n: round(statistics.median(v), 3) for n, v in ratios.items()},
                  "rounds": rep}
        if args.json and rep:  # written after each round: a stopped run keeps what it measured
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
