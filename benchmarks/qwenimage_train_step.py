"""Qwen-Image training step: persres's flow-matching step vs the bare transformer forward+backward.

    python -m benchmarks.qwenimage_train_step --json benchmarks/results/cpu-qwenimage_train_step.json

A small Qwen-Image transformer built in code (random weights; `--width`, `--layers`), the tiny
pipeline's video VAE and Qwen2.5-VL text encoder around it, one process:
- floor:   one transformer forward+backward on packed latents and text states prepared beforehand,
           called as the pipeline calls it, only the residual factors trainable, no optimizer step;
- persres: `persres.train.train_residuals`, the real training function (step times from its
           progress callback: a latent draw, normalization, packing, noise, the shifted σ, forward,
           backward, AdamW).
The two alternate round by round (`--rounds`); the report gives each round's persres/floor
ratio of median step times and their median.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.flux_train_step import compare, floor_step_times, run_arguments


def small_qwenimage_pipeline(width: int, layers: int):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from persres.testing.qwenimage import tiny_qwenimage_components

    parts = tiny_qwenimage_components()
    head = 32
    torch.manual_seed(0)
    parts["transformer"] = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * parts["vae"].config.z_dim, out_channels=parts["vae"].config.z_dim, num_layers=layers,
        attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=parts["text_encoder"].config.text_config.hidden_size,
        axes_dims_rope=(head // 8, 7 * head // 16, 7 * head // 16))  # sums to the head dim, as (16, 56, 56) to 128
    pipe = QwenImagePipeline(**parts)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    return pipe


def floor_times(pipe, args) -> list[float]:
    from persres.conditioning import encode

    model = pipe.transformer
    h = args.resolution // pipe.vae_scale_factor // 2
    latents = torch.randn(args.batch, h * h, model.config.in_channels)  # (B, L, 4C): packed
    noise = torch.randn_like(latents)
    embeds, _ = encode(pipe, "a photo of a sks dog", (args.resolution, args.resolution)).expand(args.batch)
    sigma = torch.rand(args.batch)
    shapes = [[(1, h, h)]] * args.batch

    def loss():
        noisy = (1 - sigma.view(-1, 1, 1)) * latents + sigma.view(-1, 1, 1) * noise
        out = model(hidden_states=noisy, timestep=sigma, encoder_hidden_states=embeds, img_shapes=shapes, return_dict=False)[0]
        return F.mse_loss(out, noise - latents)

    return floor_step_times(model, args, loss)


def main(argv=None) -> None:
    from persres.families.qwenimage import QWEN_RANK_RATIO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64, help="px; the tiny VAE halves it, the 2x2 patches halve it again")
    ap.add_argument("--width", type=int, default=256, help="the transformer's width (Qwen-Image: 3072)")
    ap.add_argument("--layers", type=int, default=4, help="double-stream blocks (Qwen-Image: 60)")
    ap.add_argument("--rank-ratio", type=float, default=QWEN_RANK_RATIO)
    run_arguments(ap)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = small_qwenimage_pipeline(args.width, args.layers)
    compare(pipe, args, floor_times, {"width": args.width, "layers": args.layers})


if __name__ == "__main__":
    main()
