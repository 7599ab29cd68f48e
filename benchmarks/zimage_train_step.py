"""Z-Image training step: persres's flow-matching step vs the bare transformer forward+backward.

    python -m benchmarks.zimage_train_step --json benchmarks/results/cpu-zimage_train_step.json

A small Z-Image transformer built in code (random weights; `--width`, `--layers`), the tiny
pipeline's VAE and Qwen3 text encoder around it, one process:
- floor:   one transformer forward+backward on latents and text states prepared beforehand,
           called as the pipeline calls it, only the residual factors trainable, no optimizer step;
- persres: `persres.train.train_residuals`, the real training function (step times from its
           progress callback: a latent draw, noise, the shifted σ, forward, backward, AdamW).
The two alternate round by round (`--rounds`); the report gives each round's persres/floor
ratio of median step times and their median.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.flux_train_step import compare, floor_step_times, run_arguments


def small_zimage_pipeline(width: int, layers: int):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from persres.testing.zimage import tiny_zimage_components

    parts = tiny_zimage_components()
    head = 32
    torch.manual_seed(0)
    parts["transformer"] = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=parts["vae"].config.latent_channels, dim=width, n_layers=layers,
        n_refiner_layers=1, n_heads=width // head, n_kv_heads=width // head, cap_feat_dim=parts["text_encoder"].config.hidden_size,
        axes_dims=[head // 4, 3 * head // 8, 3 * head // 8], axes_lens=[256, 64, 64])  # sums to the head dim, as (32, 48, 48) to 128
    pipe = ZImagePipeline(**parts)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    return pipe


def floor_times(pipe, args) -> list[float]:
    from persres.conditioning import encode

    model = pipe.transformer
    h = args.resolution // pipe.vae_scale_factor
    latents = torch.randn(args.batch, model.config.in_channels, h, h)  # (B, C, h, w)
    noise = torch.randn_like(latents)
    embeds, _ = encode(pipe, "a photo of a sks dog", (args.resolution, args.resolution)).expand(args.batch)
    sigma = torch.rand(args.batch)

    def loss():
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
        out = model(list(noisy.unsqueeze(2).unbind(0)), 1 - sigma, list(embeds.unbind(0)), return_dict=False)[0]
        return F.mse_loss(torch.stack(out).squeeze(2), latents - noise)

    return floor_step_times(model, args, loss)


def main(argv=None) -> None:
    from persres.families.zimage import ZIMAGE_RANK_RATIO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64, help="px; the tiny VAE halves it, the 2x2 patches halve it again")
    ap.add_argument("--width", type=int, default=256, help="the transformer's width (Z-Image-Turbo: 3840)")
    ap.add_argument("--layers", type=int, default=6, help="main layers (Z-Image-Turbo: 30)")
    ap.add_argument("--rank-ratio", type=float, default=ZIMAGE_RANK_RATIO)
    run_arguments(ap)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = small_zimage_pipeline(args.width, args.layers)
    compare(pipe, args, floor_times, {"width": args.width, "layers": args.layers})

if __name__ == "__main__":
    main()
