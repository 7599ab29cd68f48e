"""FLUX.2 training step: persres's flow-matching step vs the bare transformer forward+backward.

    python -m benchmarks.flux2_train_step --json benchmarks/results/cpu-flux2_train_step.json

A small FLUX.2 klein transformer built in code (random weights; `--width`, `--layers` double and
`--single` single-stream blocks), the tiny klein pipeline's VAE and Qwen3 text encoder around it, one
process:
- floor:   one transformer forward+backward on tokens and text states prepared beforehand, called as
           the pipeline calls it, only the residual factors trainable, no optimizer step;
- persres: `persres.train.train_residuals`, the real training function (step times from its
           progress callback: a latent draw, 2x2 patches, batch-norm normalization, packing, noise,
           the shifted σ, forward, backward, AdamW).
The two alternate round by round (`--rounds`); the report gives each round's persres/floor
ratio of median step times and their median.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.flux_train_step import compare, floor_step_times, run_arguments


def small_flux2_pipeline(width: int, layers: int, single: int):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from persres.testing.flux2 import tiny_flux2_klein_components

    parts = tiny_flux2_klein_components()
    head = 32
    torch.manual_seed(0)
    parts["transformer"] = Flux2Transformer2DModel(
        patch_size=1, in_channels=parts["transformer"].config.in_channels, num_layers=layers, num_single_layers=single,
        attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=parts["transformer"].config.joint_attention_dim,
        timestep_guidance_channels=64, axes_dims_rope=(head // 4,) * 4, guidance_embeds=False)  # 4 axes summing to the head dim
    pipe = Flux2KleinPipeline(**parts, is_distilled=False)
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
    text_ids = pipe._prepare_text_ids(embeds)
    image_ids = pipe._prepare_latent_ids(torch.empty(args.batch, 1, h, h))
    sigma = torch.rand(args.batch)

    def loss():
        noisy = (1 - sigma.view(-1, 1, 1)) * latents + sigma.view(-1, 1, 1) * noise
        out = model(hidden_states=noisy, timestep=sigma, guidance=None, encoder_hidden_states=embeds, txt_ids=text_ids,
                    img_ids=image_ids, return_dict=False)[0]
        return F.mse_loss(out, noise - latents)

    return floor_step_times(model, args, loss)


def main(argv=None) -> None:
    from persres.families.flux2 import FLUX2_KLEIN

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64, help="px; the tiny VAE halves it, the 2x2 patches halve it again")
    ap.add_argument("--width", type=int, default=256, help="the transformer's width (klein 4B: 3072)")
    ap.add_argument("--layers", type=int, default=1, help="double-stream blocks (klein 4B: 5)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (klein 4B: 20)")
    ap.add_argument("--rank-ratio", type=float, default=FLUX2_KLEIN.train_defaults["rank_ratio"])
    run_arguments(ap)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = small_flux2_pipeline(args.width, args.layers, args.single)
    compare(pipe, args, floor_times, {"width": args.width, "layers": args.layers, "single_layers": args.single})


if __name__ == "__main__":
    main()
