"""Several concepts' cost as a user meets it: `persres gen` processes on SD v1.4's architecture.

    python -m benchmarks.multi_concept_cli --json benchmarks/results/cpu-multi_concept_cli.json

Saves SD v1.4's architecture with random weights as a diffusers directory (once, under
--work), registers four concepts on it (`persres train --steps 1`: their cost, not their
pictures), then times whole `persres gen` commands at 128 px, CFG 6, default precision:
plain (no concept), one concept merged, one with LAG, four with LAG. Per-step time is the
difference between a run of --steps and one of --short steps over the difference in steps,
so start-up, model load, text encoding and decoding cancel; variants interleaved, median of
--repeats, after one warm-up run, and each variant's ratio to the plain run of the same round
(paired: a slow spell of the machine slows both), reported as median and mean with its 95%
interval over rounds. Then the same model, packs and prompts through
`Workspace.generate` in one process (what `persres gen` calls; half the steps, --repeats + 1
rounds), each variant over the plain run just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine
from persres.toy.bench import mean_ci

WORDS = (("dog", "a"), ("cat", "b"), ("vase", "c"), ("chair", "d"))


def persres(*args, env) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "persres", *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"persres {' '.join(map(str, args))} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def prepare(work: Path, env: dict) -> Path:
    from PIL import Image

    model = work / "sd14-random"
    if not (model / "model_index.json").exists():
        from persres.testing import sd14_random_pipeline

        sd14_random_pipeline().save_pretrained(model)
    for word, name in WORDS:
        images = work / f"refs-{name}"
        images.mkdir(exist_ok=True)
        for i in range(3):
            Image.new("RGB", (128, 128), (40 * i, 90, 200 - 30 * i)).save(images / f"{i}.png")
        listed = subprocess.run([sys.executable, "-m", "persres", "show", name], capture_output=True, env=env)
        if listed.returncode != 0:
            persres("train", images, "--name", name, "--class", word, "--model", model, "--steps", 1, "--resolution", 128, env=env)
    return model


def in_process(work: Path, prompts: dict[str, tuple[str, list[str], bool]], steps: int, repeats: int) -> dict[str, list[float]]:
    """The same model, packs and prompts through `persres.Workspace.generate` in this one process
    (what `persres gen` calls): per step from the step callbacks, each variant right after a plain run."""
    import torch

    from persres.registry import Registry
    from persres.workspace import Workspace

    ws = Workspace(str(work / "sd14-random"), registry=Registry(work / "home"))
    stamps: list[float] = []

    def run(prompt, concepts, lag) -> float:
        stamps.clear()
        ws.generate(prompt, concepts, steps=steps, lag=lag, height=128, width=128, guidance=6.0,
                    on_step=lambda done, total: stamps.append(time.perf_counter()))
        return (stamps[-1] - stamps[0]) / (steps - 1)

    ratios: dict[str, list[float]] = {}
    with torch.inference_mode():
        run(*prompts["plain"])  # warm-up
        for _ in range(repeats):
            for name, prompt in prompts.items():
                if name == "plain":
                    continue
                plain = run(*prompts["plain"])
                ratios.setdefault(name, []).append(run(*prompt) / plain)
                print(f"in process {name}: {ratios[name][-1]:.3f}x the plain run before it", flush=True)
    return ratios


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "persres-multi-concept-cli")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PERSRES_HOME": str(args.work / "home")}
    model = prepare(args.work, env)
    one = "a photo of a V* dog in a garden"
    four = "a photo of a V1 dog and a V2 cat and a V3 vase and a V4 chair in a garden"
    variants = {"plain": ["gen", "a photo of a dog in a garden"], "merged-1": ["gen", one, "-c", "a"],
                "lag-1": ["gen", one, "-c", "a", "--lag"],
                "lag-4": ["gen", four, "-c", "a", "-c", "b", "-c", "c", "-c", "d", "--lag"]}
    out = args.work / "out"
    common = ["--model", model, "--height", 128, "--width", 128, "--out", out, "--overwrite"]
    persres(*variants["plain"], *common, "--steps", 1, env=env)  # warm-up: the model's files into the page cache
    per_step: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, cmd in variants.items():
            long = persres(*cmd, *common, "--steps", args.steps, env=env)
            short = persres(*cmd, *common, "--steps", args.short, env=env)
            per_step.setdefault(name, []).append((long - short) / (args.steps - args.short))
            print(f"{name}: {per_step[name][-1]:.3f} s/step (runs of {long:.1f} s and {short:.1f} s)", flush=True)
    median = {n: statistics.median(v) for n, v in per_step.items()}
    paired = {n: [x / p for x, p in zip(v, per_step["plain"])] for n, v in per_step.items() if n != "plain"}
    ratios = in_process(args.work, {"plain": ("a photo of a dog in a garden", [], False), "merged-1": (one, ["a"], False),
                                    "lag-1": (one, ["a"], True), "merged-4": (four, ["a", "b", "c", "d"], False),
                                    "lag-4": (four, ["a", "b", "c", "d"], True)}, args.steps // 2, args.repeats + 1)
    report = {"machine": machine(), "resolution": 128, "steps": [args.short, args.steps], "repeats": args.repeats,
              "seconds per step": {n: round(v, 4) for n, v in median.items()},
              "relative to plain": {n: round(v / median["plain"], 3) for n, v in median.items()},
              "lag-1 relative to merged-1": round(median["lag-1"] / median["merged-1"], 3),
              "paired to the plain run of the same round": {n: {"median": round(statistics.median(v), 3),
                                                                "mean": round(mean_ci(v)[0], 3), "ci95": round(mean_ci(v)[1], 3),
                                                                "per round": [round(x, 3) for x in v]} for n, v in paired.items()},
              "in process, relative to the plain run before (median)": {n: round(statistics.median(v), 3) for n, v in ratios.items()},
              "in process, per round": {n: [round(x, 3) for x in v] for n, v in ratios.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
