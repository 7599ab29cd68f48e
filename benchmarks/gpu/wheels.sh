#!/usr/bin/env bash
# Fill the wheel folder benchmarks/gpu/run.sh installs from, on a machine with network:
#   benchmarks/gpu/wheels.sh [DIR]    (default benchmarks/gpu/wheels)
# xformers is fetched without its dependencies: it must match the GPU machine's torch
# (set XFORMERS_SPEC, e.g. "xformers==0.0.33", to pick the build).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-benchmarks/gpu/wheels}
mkdir -p "$dir"
python3 -m pip download -q --only-binary=:all: -d "$dir" diffusers sqlite-utils platformdirs typer rich pytest
python3 -m pip download -q --only-binary=:all: --no-deps -d "$dir" "${XFORMERS_SPEC:-xformers}"
echo "wheels in $dir: $(ls "$dir" | wc -l)"
