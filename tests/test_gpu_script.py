"""benchmarks/gpu/run.sh end to end on the CPU (`--cpu --tiny`): the GPU run cannot rot unseen."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_run_script_runs_on_the_cpu_and_writes_one_report(tmp_path):
    out = tmp_path / "gpu-run.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    tests = report["tests"]
    assert tests["tests"] >= 1 and tests["failures"] == 0 and tests["errors"] == 0
    assert tests["skipped"] == tests["tests"]  # no CUDA here: every gpu test is collected and skipped
    train, sample = report["train"], report["sample"]
    assert train["steps"] == 4 and train["step_s"] > 0 and train["run_s"] >= 3 * train["step_s"]
    assert train["parameters"] > 0 and train["final_loss"] > 0
    assert set(sample["step_s"]) == {"plain", "merged", "lag"} and all(v > 0 for v in sample["step_s"].values())
    assert report["precision"] == "float32"


def test_gpu_run_script_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["error: unknown option --fast (see the top of benchmarks/gpu/run.sh)"]
