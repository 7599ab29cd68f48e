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

# stabilityai/stable-diffusion-2-1: SD 1.x's layout with Linear proj_out and OpenCLIP-H's 1024 dims
SD21_UNET_CONFIG = dict(SD14_UNET_CONFIG, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                        use_linear_projection=True)

# stabilityai/stable-diffusion-xl-base-1.0
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
    norm_num_groups=32,
)


def sd_scheduler():
    """Stable Diffusion's noise schedule (scaled linear, 0.00085-0.012) under DDIM."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_vae(seed: int = 0):
    """A two-level AutoencoderKL (factor-2 latent, 4 channels), as the tiny pipelines use."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )


def tiny_components(seed: int = 0, linear_proj: bool = False, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from persres.toy.vocabulary import build_tokenizer

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
    vae = tiny_vae(seed)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=cross_attention_dim,
            intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = sd_scheduler()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None)


def build_tiny_pipeline(path: str | Path, seed: int = 0, linear_proj: bool = False) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed, linear_proj), requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def tiny_xl_components(seed: int = 0, layers: int = 2):
    """A tiny SDXL: two text encoders (the second with a projection: the pooled embedding),
    size/crop conditioning, and `layers` transformer layers in its one cross-attention block
    per level, as SDXL's blocks hold 2 or 10."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from persres.toy.vocabulary import build_tokenizer

    tokenizer = build_tokenizer()
    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, intermediate_size=37, layer_norm_eps=1e-05,
                num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **text))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **text))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, layers),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + the pooled text embedding
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        norm_num_groups=16,
    )
    vae = tiny_vae(seed)
    scheduler = sd_scheduler()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler)


def build_tiny_xl_pipeline(path: str | Path, seed: int = 0, layers: int = 2) -> Path:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_xl_components(seed, layers), add_watermarker=False)
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def _vae_to_ldm(key: str, levels: int) -> str:
    import re

    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    key = key.replace("mid_block.attentions.0", "mid.attn_1")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"attn_1.{new}.", f"attn_1.{old}.")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    return re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)


def original_layout(pipe) -> dict[str, torch.Tensor]:
    """An SD 1.x pipeline's weights named as an original-layout (CompVis/LDM) checkpoint names them."""
    from persres.families.sd import ldm_key

    depth, levels = pipe.unet.config.layers_per_block, len(pipe.vae.config.block_out_channels)
    unet = pipe.unet.state_dict()
    attention_levels = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    out = {f"model.diffusion_model.{ldm_key(k, depth, attention_levels)}": v for k, v in unet.items()}
    for k, v in pipe.vae.state_dict().items():
        if ".attentions.0.to_" in k and k.endswith("weight") or "attentions.0.to_out.0.weight" in k:
            v = v[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out[f"first_stage_model.{_vae_to_ldm(k, levels)}"] = v
    for k, v in pipe.text_encoder.state_dict().items():  # transformers 5 dropped the text_model level; checkpoints keep it
        out[f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    return out


def save_original_layout(model_dir: str | Path, path: str | Path) -> Path:
    """An SD 1.x diffusers directory as one original-layout (CompVis/LDM) .safetensors file, the
    kind AUTOMATIC1111 and ComfyUI users keep: for testing single-file loading offline."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    path = Path(path)
    save_file({k: v.contiguous() for k, v in original_layout(pipe).items()}, str(path))
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
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from persres.toy.vocabulary import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD14_UNET_CONFIG),
        vae=AutoencoderKL(**SD14_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **SD14_TEXT_CONFIG)),
        tokenizer=tokenizer,
        scheduler=sd_scheduler(),
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

    from persres.toy.vocabulary import build_tokenizer

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



def build_mini_cc101(root: str | Path) -> Path:
    """A two-concept folder in CustomConcept101's layout (dataset.json, dataset_multiconcept.json,
    prompts/, benchmark_dataset/), made of toy-world concepts and persres's own prompts, for
    running `persres bench customconcept101` offline. It contains none of Adobe's files."""
    import json

    from persres.toy import world

    root = Path(root)
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "circle.txt").write_text("photo of a {}.\nthe {} on a red background\nthe {} in the snow\n")
    (root / "prompts" / "heart.txt").write_text("photo of a {}.\nthe {} on a blue background\n")
    (root / "prompts" / "pair.txt").write_text("photo of {0} and {1}.\n")
    world.write_concept_examples(root / "benchmark_dataset", per_concept=3)
    (root / "benchmark_dataset" / "split_square").rename(root / "benchmark_dataset" / "toy_square")
    (root / "benchmark_dataset" / "checker_circle").rename(root / "benchmark_dataset" / "toy_circle")
    (root / "benchmark_dataset" / "striped_heart").rename(root / "benchmark_dataset" / "toy_heart")
    entries = [
        {"class_prompt": "circle", "instance_data_dir": "./benchmark_dataset/toy_circle", "prompt_filename": "prompts/circle.txt"},
        {"class_prompt": "heart", "instance_data_dir": "./benchmark_dataset/toy_heart", "prompt_filename": "prompts/heart.txt"},
    ]
    (root / "dataset.json").write_text(json.dumps(entries, indent=1))
    (root / "dataset_multiconcept.json").write_text(json.dumps([[*entries, {"prompt_filename_compose": "prompts/pair.txt"}]], indent=1))
    return root


@torch.no_grad()
def concept_shares(added: torch.Tensor, deltas: torch.Tensor, channel_dim: int) -> tuple[list[float], float]:
    """What explains a layer's added output at each position: nothing, or exactly one concept's
    ΔW x (`deltas`: (K, *added.shape)), judged by the largest channel difference. Returns each
    concept's share of the positions and the worst position's difference from its explanation
    (~0 where regions are disjoint and residuals exact)."""
    candidates = torch.stack([added.abs().amax(channel_dim)] + [(added - d).abs().amax(channel_dim) for d in deltas])  # (1 + K, ...)
    best = candidates.argmin(dim=0)  # 0: nothing, k: concept k
    return [(best == k).float().mean().item() for k in range(1, len(deltas) + 1)], candidates.amin(dim=0).max().item()


def above_lower_median(maps: torch.Tensor) -> torch.Tensor:
    """maps: (B, N) -> the paper's mask, recomputed apart from `persres.lag`: 1 above the lower median (fp64)."""
    ordered = maps.sort(dim=-1).values
    middle = (maps.shape[-1] - 1) // 2
    return (maps > ordered[:, middle : middle + 1]).double()


def linear_delta(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """ΔW x of concept `name` on a Linear wrapper, with ΔW = A B formed here in fp64: x (..., n) -> (..., m)."""
    factors = layer.residuals[name]
    return x.double() @ (factors.up.detach().double() @ factors.down.detach().double()).T


def fixed_noise_loss(pipe, images, prompt: str, resolution: int, seed: int = 123, batches: int = 8) -> float:
    """The training objective (`train.denoising_loss`) on `images` with seeded latents, noise and
    timesteps, so that two calls (before and after training) compare like for like."""
    from persres.train import cache_inputs, denoising_loss, prediction_of

    source = cache_inputs(pipe, images, prompt, resolution, flip=False)
    alphas, prediction = pipe.scheduler.alphas_cumprod, prediction_of(pipe.scheduler)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(batches):
        batch = source.sample(4, g)  # latents (4, 4, h, w), embedding (4, T, D)
        noise = torch.randn(batch.latents.shape, generator=g)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (4,), generator=g)
        total += denoising_loss(pipe.unet, batch, noise, t, alphas, prediction).item()
    return total / batches


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m persres.testing", description="Build tiny stand-in models and data, offline.")
    sub = ap.add_subparsers(dest="what", required=True)
    for name, help_text in (("pipeline", "a tiny SD v1.x pipeline"), ("scorers", "tiny CLIP and DINO stand-ins (DIR/clip, DIR/dino)"),
                            ("cc101-mini", "a two-concept folder in CustomConcept101's layout")):
        sub.add_parser(name, help=help_text).add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    if args.what == "pipeline":
        print(build_tiny_pipeline(args.dir))
    elif args.what == "scorers":
        print(*build_tiny_scorers(args.dir))
    else:
        print(build_mini_cc101(args.dir))


if __name__ == "__main__":
    main()


def save_tiny_pipeline(pipe, path: str | Path, train_resolution: int) -> Path:
    """A tiny pipeline saved as a diffusers directory, with a persres_defaults.json that trains it at
    `train_resolution` px (where no --resolution is given: the web app, train-many)."""
    import json

    from persres.settings import DEFAULTS_FILE

    path = Path(path)
    pipe.save_pretrained(path)
    (path / DEFAULTS_FILE).write_text(json.dumps({"train": {"resolution": train_resolution}}) + "\n")
    return path
