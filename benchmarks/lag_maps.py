"""LAG's cross-attention with token maps: explicit probabilities vs the fused kernel's log-sum-exp.

    python -m benchmarks.lag_maps                 # CPU: SD v1.x's cross-attention shapes at 512 px
    python -m benchmarks.lag_maps --precision bf16

One cross-attention call with maps for two token sets (the identifier and class word of two
concepts), at each of SD v1.x's UNet resolutions for a 512 px image (64x64, 32x32, 16x16,
8x8 latents: 4,096 to 64 queries), batch 2 (guidance), 8 heads, 77 keys. Variants:
- explicit:   softmax probabilities formed once, serving the output and the maps (persres
              before the log-sum-exp path; the `reference` backend's math in the model's dtype)
- fused-lse:  `sdpa`'s path: PyTorch's fused kernel returns output and log-sum-exp, the maps
              come from the sets' own key columns only
- torch-lse:  the same maps with the log-sum-exp computed in plain torch (the fallback)
- no maps:    the fused kernel alone (what attention costs when LAG is off)
Medians over the repeats; "per UNet pass" weights each resolution by its number of
transformer blocks (SD_BLOCKS: 2 down + 3 up at 64, 32 and 16; the mid block at 8).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median

# (latent side, channels, transformer blocks at that side) for SD v1.x at 512 px: 16 blocks
SD_BLOCKS = ((64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1))
SETS = [(5, 6), (9, 10)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from persres.kernels.attention import _explicit, lse_attention

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    variants = {
        "explicit": lambda q, k, v: _explicit(q, k, v, SETS, None),
        "fused-lse": lambda q, k, v: lse_attention(q, k, v, SETS, None),
        "torch-lse": lambda q, k, v: lse_attention(q, k, v, SETS, None, fused=False),
        "no maps": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    g = torch.Generator().manual_seed(0)
    per_side, per_pass = {}, {name: 0.0 for name in variants}
    with torch.no_grad():
        for side, channels, blocks in SD_BLOCKS:
            heads, d = 8, channels // 8
            q = torch.randn(2, heads, side * side, d, generator=g).to(dtype)
            k, v = (torch.randn(2, heads, 77, d, generator=g).to(dtype) for _ in range(2))
            times = {name: [] for name in variants}
            for rep in range(args.repeats + 1):  # interleaved; the first round warms up
                for name, fn in variants.items():
                    t = time.perf_counter()
                    fn(q, k, v)
                    if rep:
                        times[name].append(time.perf_counter() - t)
            per_side[f"{side}x{side}"] = {name: round(median(ts) * 1e3, 3) for name, ts in times.items()}
            for name, ts in times.items():
                per_pass[name] += blocks * median(ts)
    summary = {
        "machine": machine(), "precision": args.precision, "threads": torch.get_num_threads(),
        "ms per call": per_side,
        "ms per UNet pass (16 cross-attentions)": {k: round(v * 1e3, 2) for k, v in per_pass.items()},
        "fused-lse / explicit": round(per_pass["fused-lse"] / per_pass["explicit"], 3),
        "fused-lse / no maps": round(per_pass["fused-lse"] / per_pass["no maps"], 3),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
