"""How `train-many` scales from one process to two, beside what the machine itself allows.

    python -m benchmarks.train_many_scaling --concepts 4 --json benchmarks/results/cpu-train_many_scaling-4.json

- ceiling: one fixed single-threaded workload (toy-UNet training steps, forward and backward)
  alone, then two copies at once: 2 × alone ÷ together is the most two processes can gain here
  (cores that share an ALU or memory bandwidth give less than 2);
- train-many: `persres train-many` of N shipped toy concepts (--steps each) in a fresh
  registry, one process, then two under torchrun; every process one torch thread;
- fixed cost: the same manifest at one step per concept, one process and two: process start,
  imports, model load, planning, reference encoding and registration, with almost no training.

Wall time of each whole command, as a user runs it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine

WORKLOAD = """
import time, torch
torch.set_num_threads(1)
from persres import residuals
from persres.models import load_pipeline
pipe = load_pipeline("toy")
unet = pipe.unet
unet.requires_grad_(False)
for factors in residuals.new_concept(unet, "c", residuals.ranks_for(unet), init="random", seed=0).values():
    factors.requires_grad_(True)
x = torch.randn(4, unet.config.in_channels, 16, 16)
context = torch.randn(4, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
t = torch.full((4,), 500)
step = lambda: unet(x, t, encoder_hidden_states=context).sample.square().mean().backward()
step()
start = time.perf_counter()
for _ in range(STEPS):
    step()
print(time.perf_counter() - start)
"""


def env_one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ceiling(steps: int) -> dict:
    code = WORKLOAD.replace("STEPS", str(steps))
    run = lambda: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env_one_thread())  # noqa: E731
    alone = float(run().communicate()[0])
    pair = [run(), run()]
    together = max(float(p.communicate()[0]) for p in pair)
    return {"steps": steps, "alone_s": round(alone, 2), "two_at_once_s": round(together, 2), "speedup_ceiling": round(2 * alone / together, 3)}


def manifest(folder: Path, n: int, steps: int) -> Path:
    from persres.toy import world

    names = list(world.NOVEL_CONCEPTS)
    path = folder / f"manifest-{n}-{steps}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["images", "name", "class", "steps"])
        for i in range(n):
            concept = names[i % len(names)]
            w.writerow([f"toy:{concept}", f"c{i}", world.NOVEL_CONCEPTS[concept][0], steps])
    return path


def train_many(path: Path, processes: int, home: Path) -> float:
    cmd = [sys.executable, "-m", "persres", "train-many", str(path), "--model", "toy", "--device", "cpu", "--json"]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone", *cmd[1:]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env_one_thread(), "PERSRES_HOME": str(home)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"train-many failed: {done.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150, help="training steps per concept")
    ap.add_argument("--ceiling-steps", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    report = {"machine": machine(), "concepts": args.concepts, "steps per concept": args.steps, "ceiling": ceiling(args.ceiling_steps)}
    print(json.dumps(report["ceiling"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, steps in (("fixed cost (1 step per concept)", 1), ("train-many", args.steps)):
            path = manifest(tmp, args.concepts, steps)
            walls = {p: train_many(path, p, tmp / f"home-{steps}-{p}") for p in (1, 2)}
            report[label] = {"one_process_s": round(walls[1], 2), "two_processes_s": round(walls[2], 2),
                             "speedup": round(walls[1] / walls[2], 3)}
            print(json.dumps({label: report[label]}), flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
