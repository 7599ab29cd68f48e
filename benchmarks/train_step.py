"""Training step time and peak memory: persres vs the bare floor vs a straightforward diffusers+peft loop.

    python -m benchmarks.train_step                      # CPU: 256 px, batch 4
    python -m benchmarks.train_step --resolution 512 --precision bf16   # GPU
    python -m benchmarks.train_step --resolution 128 --precision fp32,bf16 --extras --loss-steps 20   # CPU precisions

SD v1.4's architecture with random weights (no download). Each variant runs in its own
process, so peak memory is its own:
- floor:   one UNet forward+backward, only the 16 residual factors trainable, latents and
           the prompt embedding prepared beforehand (the one prompt broadcast over the
           batch), no optimizer step: nothing a trainer can avoid
- persres: `persres.train.train_residuals`, the real training function (step times from
           its progress callback)
- peft:    what the DreamBooth-LoRA example does: peft LoRA on every proj_out with the same
           ranks, VAE encode and text encode every step, fp32 by default

With several precisions (`--precision fp32,bf16`) floor and persres run once per precision,
side by side. `--extras` adds the floor step with the UNet and latents in channels_last and
compiled with torch.compile (inductor), at the first precision; the compiled variant also
reports its compile time (first step minus a warm step) and what a 150-step run costs end
to end against the plain floor. `--loss-steps N` trains N steps in each precision from the
same seed and compares the losses (mean of the last half).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median, peak_memory_mb, reset_peak_memory, run_variant, sync, timed


def setup(args):
    from persres.models import pick_dtype
    from persres.testing import sd14_random_pipeline

    device = torch.device(args.device)
    dtype = pick_dtype(args.precision, device)
    pipe = sd14_random_pipeline(dtype=dtype, device=device)
    reset_peak_memory(device)
    return pipe, device, dtype


def images(n, resolution):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(resolution, resolution, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def variant_floor(args):
    return floor_with(args)[0]


def floor_with(args, channels_last: bool = False, compiled: bool = False):
    """The floor step, optionally with the UNet in channels_last or compiled; (times, first step's seconds).
    The untimed first step plus `warmup` more match persres, whose first step is paid inside its caching interval."""
    from persres import residuals

    pipe, device, dtype = setup(args)
    unet = pipe.unet
    factors = residuals.new_concept(unet, "c", residuals.ranks_for(unet))  # persres's default init
    for f in factors.values():
        f.requires_grad_(True)
    h = args.resolution // 8
    latents = torch.randn(args.batch, 4, h, h, device=device, dtype=dtype)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    noise = torch.randn_like(latents)
    # one prompt for the whole batch, broadcast (stride 0), as any trainer of one concept can do
    emb = torch.randn(1, 77, 768, device=device, dtype=dtype).expand(args.batch, -1, -1)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    params = [p for f in factors.values() for p in f.parameters()]
    forward = torch.compile(unet) if compiled else unet

    def step():
        for p in params:
            p.grad = None
        pred = forward(latents, t, encoder_hidden_states=emb).sample
        F.mse_loss(pred.float(), noise.float()).backward()

    first = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - first
    return timed(step, device, args.warmup, args.steps), first


def variant_channels_last(args):
    return floor_with(args, channels_last=True)[0]


def variant_compile(args):
    times, first = floor_with(args, compiled=True)
    return times, {"first_step_s": first}


def variant_loss(args):
    """Per-step training losses of `persres.train.train_residuals` at this precision."""
    from persres.config import TrainConfig
    from persres.train import train_residuals

    pipe, device, dtype = setup(args)
    losses = []
    config = TrainConfig(steps=args.loss_steps, batch_size=args.batch, resolution=args.resolution,
                         device=args.device, precision=args.precision, seed=0)
    train_residuals(pipe, images(5, args.resolution), "sks", "dog", config, lambda step, loss: losses.append(loss))
    return losses


def variant_persres(args):
    from persres.config import TrainConfig
    from persres.train import train_residuals

    pipe, device, dtype = setup(args)
    stamps = []

    def progress(step, loss):
        sync(device)
        stamps.append(time.perf_counter())

    config = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=args.batch, resolution=args.resolution,
                         device=args.device, precision=args.precision, flip=True)
    t0 = time.perf_counter()
    train_residuals(pipe, images(5, args.resolution), "sks", "dog", config, progress)
    stamps.insert(0, t0)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return intervals[args.warmup + 1 :]  # the first interval includes caching the latents


def variant_peft(args):
    from peft import LoraConfig

    from persres import residuals
    from persres.images import to_tensor

    pipe, device, dtype = setup(args)
    unet = pipe.unet
    ranks = residuals.ranks_for(unet)
    expected = residuals.parameter_count(ranks, residuals.block_channels(unet))
    targets = [f"{block}.proj_out" for block in ranks]
    config = LoraConfig(r=16, lora_alpha=16, target_modules=targets, init_lora_weights=True,
                        rank_pattern={t: r for t, r in zip(targets, ranks.values())},
                        alpha_pattern={t: r for t, r in zip(targets, ranks.values())})
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == expected, sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    pixels = torch.stack([to_tensor(im) for im in images(args.batch, args.resolution)]).to(device, dtype)
    ids = pipe.tokenizer(["a photo of a sks dog"] * args.batch, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    sched = pipe.scheduler

    def step():
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        emb = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, device, args.warmup + 1, args.steps)


VARIANTS = {"floor": variant_floor, "persres": variant_persres, "peft": variant_peft}
EXTRAS = {"floor-channels_last": variant_channels_last, "floor-compile": variant_compile}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=[*VARIANTS, *EXTRAS, "loss"])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", help="one precision, or several comma-separated (fp32,bf16)")
    ap.add_argument("--extras", action="store_true", help="also channels_last and torch.compile floor steps")
    ap.add_argument("--loss-steps", type=int, default=0, help="train this many steps per precision and compare losses")
    ap.add_argument("--peft-precision", default="fp32", help="the straightforward loop's precision (the example script's default: fp32)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.variant:
        if args.variant == "peft":
            args.precision = args.peft_precision
        if args.variant == "loss":
            print(json.dumps({"losses": variant_loss(args)}))
            return
        got = {**VARIANTS, **EXTRAS}[args.variant](args)
        times, more = got if isinstance(got, tuple) else (got, {})
        print(json.dumps({"step_s": median(times), "times": times, "peak_mb": peak_memory_mb(args.device), **more}))
        return
    passthrough = ["--resolution", str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device, "--peft-precision", args.peft_precision,
                   "--loss-steps", str(args.loss_steps)]
    precisions = args.precision.split(",")
    if len(precisions) > 1:
        return compare_precisions(args, precisions, passthrough)
    passthrough += ["--precision", args.precision]
    results = {name: run_variant(__file__, name, passthrough) for name in VARIANTS}
    f, p, b = (results[k]["step_s"] for k in ("floor", "persres", "peft"))
    summary = {
        "machine": machine(), "resolution": args.resolution, "batch": args.batch, "precision": args.precision,
        "step_s": {k: round(v["step_s"], 4) for k, v in results.items()},
        "peak_mb": {k: round(v["peak_mb"]) for k, v in results.items()},
        "persres/floor": round(p / f, 3), "persres/peft": round(p / b, 3),
        "peak persres/peft": round(results["persres"]["peak_mb"] / results["peft"]["peak_mb"], 3),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def compare_precisions(args, precisions: list[str], passthrough: list[str]) -> None:
    rows = {f"{name}@{p}": run_variant(__file__, name, [*passthrough, "--precision", p])
            for p in precisions for name in ("floor", "persres")}
    first = precisions[0]
    if args.extras:
        rows.update({f"{name}@{first}": run_variant(__file__, name, [*passthrough, "--precision", first]) for name in EXTRAS})
    floor = rows[f"floor@{first}"]["step_s"]
    summary = {
        "machine": machine(), "resolution": args.resolution, "batch": args.batch,
        "step_s": {k: round(v["step_s"], 4) for k, v in rows.items()},
        "peak_mb": {k: round(v["peak_mb"]) for k, v in rows.items()},
        f"relative to floor@{first}": {k: round(v["step_s"] / floor, 3) for k, v in rows.items()},
    }
    compiled = rows.get(f"floor-compile@{first}")
    if compiled:
        compile_s = compiled["first_step_s"] - compiled["step_s"]
        summary["compile_s"] = round(compile_s, 1)
        summary["150 steps end to end, compiled / plain"] = round((compile_s + 150 * compiled["step_s"]) / (150 * floor), 3)
    if args.loss_steps:
        losses = {p: run_variant(__file__, "loss", [*passthrough, "--precision", p])["losses"] for p in precisions}
        half = args.loss_steps // 2
        tail = {p: sum(v[half:]) / len(v[half:]) for p, v in losses.items()}
        summary["loss"] = {"steps": args.loss_steps, "mean of the last half": {p: round(v, 5) for p, v in tail.items()},
                           "relative difference": {p: round(tail[p] / tail[first] - 1, 4) for p in precisions[1:]},
                           "per step": {p: [round(x, 5) for x in v] for p, v in losses.items()}}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
