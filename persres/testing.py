"""Tiny SD-architecture pipelines built in code, for tests, benchmarks and offline demos.

`build_tiny_pipeline(path)` saves a random-weights StableDiffusionPipeline (diffusers'
dummy-components scale) with `save_pretrained`, so it loads through the same
`from_pretrained` path as a real checkpoint. `SD14_UNET_CONFIG` is the UNet of
CompVis/stable-diffusion-v1-4, for building that architecture with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

SD14_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


def tiny_components(seed: int = 0, linear_proj: bool = False, cross_attention_dim: int = 32):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from persres.toy.build import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=16,
        use_linear_projection=linear_proj,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=cross_attention_dim,
            intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None)


def build_tiny_pipeline(path: str | Path, seed: int = 0, linear_proj: bool = False) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed, linear_proj), requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
