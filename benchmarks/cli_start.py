"""Wall time of the registry commands as whole processes: `persres list` with 2 and 200 concepts
beside `persres --help`.

    python -m benchmarks.cli_start --json benchmarks/results/cpu-cli_start.json

Each command runs `--repeats` times in a fresh `persres` process (the console script, as a user
runs it) on a registry of packs registered in place (fake factors; `list` reads rows only),
and the median is reported with its ratio to `--help`.
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


def timed(args: list[str], env: dict, repeats: int) -> float:
    exe = shutil.which("persres")
    times = []
    for _ in range(repeats + 1):  # the first run warms the file cache and is dropped
        t = time.perf_counter()
        subprocess.run([exe, *args], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from benchmarks.common import machine

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 200):
            home = Path(tmp) / f"home{n}"
            fill(home, n)
            env = {**os.environ, "PERSRES_HOME": str(home)}
            rows[f"list ({n} concepts)"] = timed(["list"], env, args.repeats)
        rows["--help"] = timed(["--help"], {**os.environ, "PERSRES_HOME": str(Path(tmp) / "home2")}, args.repeats)
    report = {"machine": machine(), "repeats": args.repeats,
              "median_s": {k: round(v, 3) for k, v in rows.items()},
              "ratio_to_help": {k: round(v / rows["--help"], 2) for k, v in rows.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
