#!/usr/bin/env bash
# One GPU run of persres, within 8 minutes on one H200-class machine without network:
#   1. the gpu-marked tests (CUDA SDPA and xformers log-sum-exp maps against the reference,
#      fp16/bf16 training and sampling),
#   2. the paper's timing: 150 training steps, batch 4, 512 px, SD v1.4's architecture with
#      random weights, bf16; sampling per step with and without LAG (benchmarks/gpu/paper_timing.py).
# Everything lands in one JSON (--out, default gpu-run.json).
#
#   benchmarks/gpu/run.sh [--wheels DIR] [--out FILE]     # on the GPU machine
#   benchmarks/gpu/run.sh --cpu --tiny --out FILE         # the same steps on the CPU, seconds (CI runs this)
#
# The machine is expected to have PyTorch with CUDA, transformers, peft and accelerate. What it
# lacks comes as wheels in DIR (default benchmarks/gpu/wheels; fill it on a machine with network
# with benchmarks/gpu/wheels.sh), installed with --no-index; persres itself runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
cpu=() tiny=() wheels=benchmarks/gpu/wheels out=gpu-run.json
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cpu=(--cpu) ;;
        --tiny) tiny=(--tiny) ;;
        --wheels) wheels="$2"; shift ;;
        --out) out="$2"; shift ;;
        *) echo "error: unknown option $1 (see the top of benchmarks/gpu/run.sh)" >&2; exit 1 ;;
    esac
    shift
done
if [ -d "$wheels" ]; then
    python3 -m pip install -q --no-index --find-links "$wheels" diffusers sqlite-utils platformdirs typer rich pytest
    if ls "$wheels"/xformers-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps "$wheels"/xformers-*.whl  # built against the machine's torch
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
set +e
python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml "$work/tests.xml" tests > "$work/tests.log" 2>&1
tests_rc=$?
set -e
tail -n 3 "$work/tests.log"
tests_s=$(( $(date +%s) - start ))

python3 -m benchmarks.gpu.paper_timing "${cpu[@]}" "${tiny[@]}" --json "$work/timing.json"

python3 - "$work" "$out" "$tests_rc" "$tests_s" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, rc, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
suite = ET.parse(work / "tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
report = {"tests": {"command": "pytest -m gpu tests", "exit_code": rc, "seconds": seconds, **counts},
          **json.loads((work / "timing.json").read_text())}
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out}")
sys.exit(0 if rc in (0, 5) else 1)  # 5: no test collected
PY
