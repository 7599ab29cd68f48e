"""Sampling cost of LAG and of folded residuals, side by side in one process.

    python -m benchmarks.gen_overhead                  # CPU: 256 px, 10 DDIM steps
    python -m benchmarks.gen_overhead --resolution 512 --steps 50 --precision fp16   # GPU
    python -m benchmarks.gen_overhead --resolution 128 --precision fp32,bf16     # CPU: precisions side by side

Several precisions run one after another, each in its own process (so peak memory is its
own), and the summary puts them side by side with each one's time relative to the first.

SD v1.4's architecture with random weights. Variants, interleaved over the repeats so that
drift hits them alike:
- base:        diffusers' StableDiffusionPipeline alone (no persres module in the UNet)
- nolag-1:     persres, one concept, residual folded into the weights
- lag-1:       persres, one concept, LAG
- nolag-3, lag-3: the same with three concepts in one prompt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import machine, median, peak_memory_mb, reset_peak_memory, run_variant, sync

PROMPT_1 = "a photo of a sks dog on a sofa"
PROMPT_3 = "a photo of a sks dog and a zwx cat and a qrv vase on a sofa"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # one precision, in its own process
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", help="one precision, or several comma-separated (fp32,bf16)")
    ap.add_argument("--backend", default=None, help="attention backend for LAG (default: sdpa)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    precisions = args.precision.split(",")
    if len(precisions) > 1 and not args.variant:
        passthrough = ["--resolution", str(args.resolution), "--steps", str(args.steps), "--repeats", str(args.repeats),
                       "--device", args.device, *(["--backend", args.backend] if args.backend else [])]
        each = {p: run_variant(__file__, p, [*passthrough, "--precision", p]) for p in precisions}
        first = each[precisions[0]]["seconds"]
        summary = {"machine": machine(), "resolution": args.resolution, "steps": args.steps, "precisions": each,
                   f"lag-1 relative to {precisions[0]}": {p: round(e["seconds"]["lag-1"] / first["lag-1"], 3) for p, e in each.items()},
                   f"nolag-1 relative to {precisions[0]}": {p: round(e["seconds"]["nolag-1"] / first["nolag-1"], 3) for p, e in each.items()}}
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return

    import time

    from persres import residuals
    from persres.config import SampleConfig
    from persres.models import pick_dtype
    from persres.sample import generate
    from persres.testing import sd14_random_pipeline
    from persres.tokens import BoundConcept

    device = torch.device(args.device)
    pipe = sd14_random_pipeline(dtype=pick_dtype(args.precision, device), device=device)
    reset_peak_memory(device)
    call = dict(num_inference_steps=args.steps, guidance_scale=6.0, eta=0.0, height=args.resolution, width=args.resolution)

    def base():
        pipe(PROMPT_1, generator=torch.Generator(device).manual_seed(0), **call)

    concepts = [BoundConcept("dog", "sks", "dog"), BoundConcept("cat", "zwx", "cat"), BoundConcept("vase", "qrv", "vase")]
    cfg = SampleConfig(steps=args.steps, height=args.resolution, width=args.resolution)

    def persres(prompt, k, lag):
        return lambda: generate(pipe, prompt, concepts[:k], cfg.replace(lag=lag), backend=args.backend)

    variants = {"base": base}
    times: dict[str, list[float]] = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, fn in list(variants.items()):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if rep:
                times.setdefault(name, []).append(time.perf_counter() - t)
        if rep == 0:  # inject after base's warm-up, so base ran on the untouched UNet once
            residuals.remove(pipe.unet)
            ranks = residuals.ranks_for(pipe.unet)
            for i, c in enumerate(concepts):
                residuals.new_concept(pipe.unet, c.name, ranks, init="random", seed=i)
            variants.update({"nolag-1": persres(PROMPT_1, 1, False), "lag-1": persres(PROMPT_1, 1, True),
                             "nolag-3": persres(PROMPT_3, 3, False), "lag-3": persres(PROMPT_3, 3, True)})
            for name in list(variants)[1:]:
                variants[name]()  # warm-up
    s = {k: median(v) for k, v in times.items()}
    summary = {
        "machine": machine(), "resolution": args.resolution, "steps": args.steps, "precision": args.precision,
        "seconds": {k: round(v, 3) for k, v in s.items()},
        "lag-1/nolag-1": round(s["lag-1"] / s["nolag-1"], 3),
        "lag-3/nolag-3": round(s["lag-3"] / s["nolag-3"], 3),
        "nolag-1/base": round(s["nolag-1"] / s["base"], 3),
        "seconds per step": {k: round(v / args.steps, 3) for k, v in s.items()},
        "peak_mb": round(peak_memory_mb(device)),
    }
    if device.type == "cuda":
        summary["lag-1 s/image (50 steps)"] = round(s["lag-1"] * 50 / args.steps, 3)
    if args.variant:
        print(json.dumps(summary))
        return
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
