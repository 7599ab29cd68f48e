"""The paper's timing on one machine: a full training run (150 steps, batch 4, 512 px, SD v1.4's
architecture with random weights) and sampling per step with and without LAG, as one JSON.

    python -m benchmarks.gpu.paper_timing --json OUT.json              # CUDA, bf16
    python -m benchmarks.gpu.paper_timing --cpu --tiny --json OUT.json  # the tiny model on the CPU, seconds

Training: `persres.train.train_residuals`, the whole run timed (reference encoding included)
and per step from its progress callback (the first step, which warms up, left out).
Sampling: one concept, merged (no LAG) and LAG, and the plain base model, per step from the
first UNet evaluation to the end of the last step, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import StepClock, machine, peak_memory_mb, reset_peak_memory, sync


def pipeline(tiny: bool, device: torch.device, dtype: torch.dtype):
    from persres.models import load_pipeline
    from persres.testing import build_tiny_pipeline, sd14_random_pipeline

    if tiny:  # saved and loaded as a user's model is
        folder = build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="persres-tiny-")) / "tiny-sd")
        return load_pipeline(str(folder), device, dtype)
    return sd14_random_pipeline(dtype=dtype, device=device)


def references(n: int, side: int):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def train_timing(pipe, device, steps: int, batch: int, resolution: int) -> dict:
    from persres.config import TrainConfig
    from persres.train import train_residuals

    stamps: list[float] = []

    def progress(step, loss):
        sync(device)
        stamps.append(time.perf_counter())

    reset_peak_memory(device)
    config = TrainConfig(steps=steps, batch_size=batch, resolution=resolution, device=device.type, seed=0)
    sync(device)
    start = time.perf_counter()
    result = train_residuals(pipe, references(5, resolution), "sks", "dog", config, progress)
    sync(device)
    total = time.perf_counter() - start
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"steps": steps, "batch": batch, "resolution": resolution, "parameters": result.parameter_count,
            "run_s": round(total, 3), "step_s": round(statistics.median(per_step), 4) if per_step else None,
            "final_loss": round(result.losses[-1], 5), "peak_mb": round(peak_memory_mb(device))}


def sample_timing(pipe, device, steps: int, resolution: int, repeats: int) -> dict:
    from persres import residuals
    from persres.config import SampleConfig
    from persres.sample import generate
    from persres.tokens import BoundConcept

    residuals.new_concept(pipe.unet, "dog", residuals.ranks_for(pipe.unet), init="random", seed=0)
    concept = [BoundConcept("dog", "sks", "dog")]
    prompt = "a photo of a sks dog on a sofa"
    cfg = SampleConfig(steps=steps, height=resolution, width=resolution)
    clock = StepClock(pipe.unet, device=device)
    on_step = clock.on_step

    variants = {"plain": lambda: generate(pipe, prompt, [], cfg, on_step=on_step),
                "merged": lambda: generate(pipe, prompt, concept, cfg.replace(lag=False), on_step=on_step),
                "lag": lambda: generate(pipe, prompt, concept, cfg.replace(lag=True), on_step=on_step)}
    times: dict[str, list[float]] = {}
    try:
        for rep in range(repeats + 1):  # round 0 warms up
            for name, run in variants.items():
                clock.reset()
                run()
                if rep:
                    times.setdefault(name, []).append(clock.per_step(steps))
    finally:
        clock.remove()
        residuals.remove(pipe.unet)
    step_s = {n: statistics.median(v) for n, v in times.items()}
    return {"steps": steps, "resolution": resolution, "step_s": {n: round(v, 4) for n, v in step_s.items()},
            "lag/merged": round(step_s["lag"] / step_s["merged"], 3), "merged/plain": round(step_s["merged"] / step_s["plain"], 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (fp32)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model, a few steps: the script's own check")
    ap.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from persres.models import pick_dtype

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = pick_dtype(args.precision or ("bf16" if device.type == "cuda" else "fp32"), device)
    train_args = dict(steps=4, batch=2, resolution=16) if args.tiny else dict(steps=150, batch=4, resolution=512)
    sample_args = dict(steps=4, resolution=16, repeats=1) if args.tiny else dict(steps=50, resolution=512, repeats=3)
    torch.manual_seed(0)
    pipe = pipeline(args.tiny, device, dtype)
    report = {"machine": machine(), "model": "tiny test model" if args.tiny else "SD v1.4 architecture, random weights",
              "precision": str(dtype).removeprefix("torch."),
              "train": train_timing(pipe, device, **train_args),
              "sample": sample_timing(pipe, device, **sample_args)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
