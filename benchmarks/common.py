"""Shared helpers for the benchmarks: run a variant in a fresh process, time it, read its peak memory."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} CPU"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def reset_peak_memory(device) -> None:
    """Start peak tracking after the model is built, so the peak is model + training."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident set size (VmHWM) of this process on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(script: str, variant: str, args: list[str]) -> dict:
    """Run `python script --variant NAME args` in a fresh process; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, script, "--variant", variant, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"variant {variant} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class StepClock:
    """Per-step time of a sampling run: from the first UNet evaluation (a forward pre-hook on each
    UNet) to the end of the last step (`on_step`, the sampler's step callback), and how many UNet
    evaluations ran. `reset()` before each run; `remove()` when done."""

    def __init__(self, *unets, device="cpu"):
        self.device = device
        self.evaluations, self.started, self.ended = 0, None, None
        self.hooks = [u.register_forward_pre_hook(self._pre) for u in unets]

    def _pre(self, module, args) -> None:
        self.evaluations += 1
        if self.started is None:
            self.started = time.perf_counter()

    def on_step(self, done: int, total: int) -> None:
        if done == total:
            sync(self.device)
            self.ended = time.perf_counter()

    def reset(self) -> None:
        self.evaluations, self.started, self.ended = 0, None, None

    def per_step(self, steps: int) -> float:
        return (self.ended - self.started) / steps

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
