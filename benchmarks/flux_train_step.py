"""FLUX.1 training step: persres's flow-matching step vs the bare transformer forward+backward.

    python -m benchmarks.flux_train_step --json benchmarks/results/cpu-flux_train_step.json

A small FLUX transformer built in code (random weights; `--width`, `--single`, `--double`
blocks), the tiny pipeline's VAE and text encoders around it, one process:
- floor:   one transformer forward+backward on packed latents, text states, ids and guidance
           prepared beforehand, only the residual factors trainable, no optimizer step;
- persres: `persres.train.train_residuals`, the real training function (step times from its
           progress callback: a latent draw, noise, the shifted σ, forward, backward, AdamW).
The two alternate round by round (`--rounds`); the report gives each round's persres/floor
ratio of median step times and their median.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median, timed


def small_flux_pipeline(width: int, single: int, double: int):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from persres.testing.flux import tiny_flux_components

    parts = tiny_flux_components()
    head = 32
    rope = (head // 4, 3 * head // 8, 3 * head // 8)  # sums to the head dim, as FLUX.1's (16, 56, 56) sums to 128
    torch.manual_seed(0)
    parts["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * parts["vae"].config.latent_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=parts["text_encoder_2"].config.d_model,
        pooled_projection_dim=parts["text_encoder"].config.hidden_size, guidance_embeds=True, axes_dims_rope=rope)
    pipe = FluxPipeline(**parts)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
        part.eval()
    return pipe


def images(n, resolution):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(resolution, resolution, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def floor_times(pipe, args) -> list[float]:
    from persres.conditioning import encode
    from persres.families.flux import image_ids

    model = pipe.transformer
    h = args.resolution // pipe.vae_scale_factor
    tokens, channels = (h // 2) ** 2, model.config.in_channels
    latents = torch.randn(args.batch, tokens, channels)  # (B, L, 4C): packed
    noise = torch.randn_like(latents)
    embeds, added = encode(pipe, "a photo of a sks dog", (args.resolution, args.resolution)).expand(args.batch)
    pooled, text_ids = added["pooled_projections"], torch.zeros(embeds.shape[1], 3)
    ids, sigma, guidance = image_ids(pipe, h, h, "cpu"), torch.rand(args.batch), torch.full((args.batch,), 3.5)

    def loss():
        noisy = (1 - sigma.view(-1, 1, 1)) * latents + sigma.view(-1, 1, 1) * noise
        pred = model(hidden_states=noisy, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                     encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        return F.mse_loss(pred, noise - latents)

    return floor_step_times(model, args, loss)


def floor_step_times(model, args, loss) -> list[float]:
    """Times of one `loss().backward()` with only a fresh concept's residual factors trainable (no
    optimizer step): the floor a training step of `model` cannot go below."""
    from persres import residuals

    factors = residuals.new_concept(model, "floor", residuals.ranks_for(model, args.rank_ratio))
    params = [p for f in factors.values() for p in f.parameters()]
    for p in params:
        p.requires_grad_(True)

    def step():
        for p in params:
            p.grad = None
        loss().backward()

    with residuals.use_concepts(model, ["floor"], merged=False):
        times = timed(step, "cpu", args.warmup + 1, args.steps)
    residuals.unload_concept(model, "floor")
    return times


def persres_times(pipe, args) -> list[float]:
    from persres.config import TrainConfig
    from persres.train import train_residuals

    stamps = []
    config = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=args.batch, resolution=args.resolution,
                         rank_ratio=args.rank_ratio, precision="fp32", device="cpu")
    t0 = time.perf_counter()
    train_residuals(pipe, images(5, args.resolution), "sks", "dog", config, lambda step, loss: stamps.append(time.perf_counter()))
    stamps.insert(0, t0)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return intervals[args.warmup + 1:]  # the first interval includes encoding the references


def run_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every training-step comparison takes besides its transformer's shape."""
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)


def compare(pipe, args, floor, shape: dict) -> None:
    """`args.rounds` rounds of `floor(pipe, args)` then `persres_times`, each round's median step times and
    ratio, then the summary (`shape`: the transformer's, its parameter count added) printed and written."""
    rounds = []
    for _ in range(args.rounds):
        bare, ours = median(floor(pipe, args)), median(persres_times(pipe, args))
        rounds.append({"floor_s": round(bare, 4), "persres_s": round(ours, 4), "persres/floor": round(ours / bare, 3)})
        print(json.dumps(rounds[-1]), flush=True)
    summary = {
        "machine": machine(), "threads": torch.get_num_threads(), "resolution": args.resolution, "batch": args.batch,
        "image_tokens": (args.resolution // pipe.vae_scale_factor // 2) ** 2,
        "transformer": {**shape, "parameters": sum(p.numel() for p in pipe.transformer.parameters())},
        "rounds": rounds, "persres/floor (median of rounds)": median([r["persres/floor"] for r in rounds]),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None) -> None:
    from persres.families import FLUX_RANK_RATIO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64, help="px; the tiny VAE halves it, packing halves it again")
    ap.add_argument("--width", type=int, default=256, help="the transformer's width (FLUX.1-dev: 3072)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    ap.add_argument("--rank-ratio", type=float, default=FLUX_RANK_RATIO)
    run_arguments(ap)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = small_flux_pipeline(args.width, args.single, args.double)
    compare(pipe, args, floor_times, {"width": args.width, "single_blocks": args.single, "double_blocks": args.double})

if __name__ == "__main__":
    main()
