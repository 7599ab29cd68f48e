"""Wall time of the registry commands as whole processes: `persres list` with 2 and 200 concepts
beside `persres --help`.

    python -m benchmarks.cli_start --json benchmarks/results/cpu-cli_start.json

Each command runs `--repeats` times in a fresh `persres` process (the console script, as a user
runs it) on a registry of packs registered in place (fake factors; `list` reads rows only).
The commands take turns, one run each per round, so that a slow spell of the machine slows
all of them alike; the median is reported with its ratio to `--help`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def fill(home: Path, n: int) -> None:
    import torch

    from persres.packs import PackMeta
    from persres.registry import Registry

    registry = Registry(home)
    for i in range(n):
        meta = PackMeta(name=f"c{i}", identifier=f"id{chr(97 + i // 26 % 26)}{chr(97 + i % 26)}", class_word="dog",
                        ranks={"blk": 2}, channels={"blk": 8}, parameter_count=32, base_model="toy",
                        architecture="arch", weights="w", train_config={}, image_hashes=[], created_at="2026-01-01")
        registry.add({"blk.up": torch.randn(8, 2), "blk.down": torch.randn(2, 8)}, meta, allow_shared_identifier=True)


def timed(commands: dict[str, tuple[list[str], dict]], repeats: int) -> dict[str, float]:
    """Median wall time of each (arguments, environment), the commands interleaved round by round."""
    exe = shutil.which("persres")
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(repeats + 1):  # the first round warms the file cache and is dropped
        for label, (args, env) in commands.items():
            t = time.perf_counter()
            subprocess.run([exe, *args], env=env, check=True, capture_output=True)
            times[label].append(time.perf_counter() - t)
    return {label: statistics.median(ts[1:]) for label, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from benchmarks.common import machine

    with tempfile.TemporaryDirectory() as tmp:
        commands = {}
        for n in (2, 200):
            home = Path(tmp) / f"home{n}"
            fill(home, n)
            commands[f"list ({n} concepts)"] = (["list"], {**os.environ, "PERSRES_HOME": str(home)})
        commands["--help"] = (["--help"], {**os.environ, "PERSRES_HOME": str(Path(tmp) / "home2")})
        rows = timed(commands, args.repeats)
    report = {"machine": machine(), "repeats": args.repeats,
              "median_s": {k: round(v, 3) for k, v in rows.items()},
              "ratio_to_help": {k: round(v / rows["--help"], 2) for k, v in rows.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
