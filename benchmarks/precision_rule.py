"""Where bf16 beats fp32 on a CPU that computes bf16 natively: a training step and a sampling
evaluation of UNets from the toy model's size to SD v1.4's (its channels scaled), each in both precisions.

    python -m benchmarks.precision_rule --json benchmarks/results/cpu-precision_rule.json

The data behind `--precision auto` on the CPU (`persres.models.BF16_MIN_UNET_WIDTH`): each UNet
is built in code with random weights; its width is `persres.sizes.unet_width` of its config.
Training step: batch 4, one concept's residuals trainable (fp32 factors, as persres trains),
forward and backward. Sampling: one CFG evaluation (batch 2) without gradients. Latents
16x16 (128 px on SD v1.4, the toy model's own size); median of --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median, timed


def configs() -> dict[str, dict]:
    from persres.models import TOY_DIR
    from persres.testing import SD14_UNET_CONFIG

    toy = json.loads((TOY_DIR / "unet" / "config.json").read_text())
    toy = {k: v for k, v in toy.items() if not k.startswith("_")}
    out = {"toy": toy}
    for name, scale in (("sd14 x1/8", 1 / 8), ("sd14 x1/4", 1 / 4), ("sd14 x1/2", 1 / 2), ("sd14", 1)):
        channels = [int(c * scale) for c in SD14_UNET_CONFIG["block_out_channels"]]
        groups = 32 if all(c % 32 == 0 for c in channels) else 8  # GroupNorm needs groups dividing every width
        out[name] = {**SD14_UNET_CONFIG, "block_out_channels": channels, "norm_num_groups": groups}
    return out


def measure(config: dict, dtype: torch.dtype, repeats: int, side: int = 16) -> dict[str, float]:
    from diffusers import UNet2DConditionModel

    from persres import residuals

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False).to(dtype)
    factors = residuals.new_concept(unet, "c", residuals.ranks_for(unet), init="random", seed=0)
    for f in factors.values():
        f.requires_grad_(True)
    channels, context_dim = config["in_channels"], config["cross_attention_dim"]
    latents = torch.randn(4, channels, side, side).to(dtype)
    context = torch.randn(4, 77, context_dim).to(dtype)
    t = torch.full((4,), 500)

    def train_step():
        out = unet(latents, t, encoder_hidden_states=context).sample
        F.mse_loss(out.float(), latents.float()).backward()

    def sample_evaluation():
        with torch.no_grad():
            unet(latents[:2], t[:2], encoder_hidden_states=context[:2])

    return {"train": median(timed(train_step, "cpu", 1, repeats)), "sample": median(timed(sample_evaluation, "cpu", 1, repeats))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma-separated config names")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from persres.models import cpu_native_bf16
    from persres.sizes import unet_width

    rows = []
    for name, config in configs().items():
        if args.only and name not in args.only.split(","):
            continue
        fp32, bf16 = measure(config, torch.float32, args.repeats), measure(config, torch.bfloat16, args.repeats)
        row = {"unet": name, "width": unet_width(config), "fp32_s": {k: round(v, 4) for k, v in fp32.items()},
               "bf16_s": {k: round(v, 4) for k, v in bf16.items()},
               "bf16/fp32": {k: round(bf16[k] / fp32[k], 3) for k in fp32}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"machine": machine(), "native_bf16": cpu_native_bf16(), "threads": torch.get_num_threads(), "rows": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
