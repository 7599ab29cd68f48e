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



SD14_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)

SD14_TEXT_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)


def sd14_random_pipeline(seed: int = 0, dtype=torch.float32, device="cpu"):
    """SD v1.4's architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random weights.

    No download: the tokenizer is the toy vocabulary padded to SD's 77 tokens. For
    benchmarks, where the cost and not the picture matters.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from persres.toy.build import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD14_UNET_CONFIG),
        vae=AutoencoderKL(**SD14_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **SD14_TEXT_CONFIG)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    return pipe.to(device, dtype)



def build_tiny_scorers(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Tiny random CLIP (with tokenizer) and ViT models saved to disk, standing in for
    openai/clip-vit-base-patch32 and facebook/dino-vits16 in tests: same loading path, real math."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from persres.toy.build import build_tokenizer

    folder = Path(folder)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16,
    ))
    clip.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    torch.manual_seed(seed)
    dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=16), add_pooling_layer=False)
    dino.save_pretrained(folder / "dino")
    return folder / "clip", folder / "dino"



if __name__ == "__main__":
    import sys

    print(build_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
