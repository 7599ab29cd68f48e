"""A tiny Z-Image pipeline built in code (tests, offline demos), and Z-Image-Turbo's configs.

`build_tiny_zimage_pipeline(path)` saves a random-weights `ZImagePipeline` (two single-stream
layers and one refiner of each kind, a tiny Qwen3 text encoder with a chat-template tokenizer in
which persres's identifiers are single tokens, a two-level VAE) with `save_pretrained`, so it loads
through the same `from_pretrained` path as Tongyi-MAI/Z-Image-Turbo.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (ZImageTransformer2DModel's defaults)
ZIMAGE_TURBO_TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
    n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
)
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
ZIMAGE_TURBO_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
TEXT_TOKENS = 96  # the tiny tokenizer's model_max_length


def tiny_zimage_components(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from persres.testing.chat import chat_tokenizer
    from persres.toy import world

    tokenizer = chat_tokenizer(world.vocabulary(), TEXT_TOKENS)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        shift_factor=0.1, scaling_factor=0.5, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER_CONFIG)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


TRAIN_RESOLUTION = 32  # px: the tiny model's training default (persres_defaults.json; Z-Image's own is 1024)


def build_tiny_zimage_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny pipeline saved as a diffusers directory, with a persres_defaults.json that trains it at
    `TRAIN_RESOLUTION` (where no --resolution is given: the web app, train-many)."""
    from diffusers import ZImagePipeline

    from persres.testing import save_tiny_pipeline

    return save_tiny_pipeline(ZImagePipeline(**tiny_zimage_components(seed)), path, TRAIN_RESOLUTION)


def save_original_layout(transformer, path: str | Path) -> Path:
    """A Z-Image transformer as one .safetensors file in the original layout ComfyUI loads as a diffusion
    model (q/k/v fused as `attention.qkv`, `attention.out`, `x_embedder`, `final_layer`): what
    `ZImageTransformer2DModel.from_single_file` converts back."""
    from safetensors.torch import save_file

    out = {}
    for key, value in transformer.state_dict().items():
        value = value.detach().contiguous()
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [transformer.state_dict()[key.replace("to_q", x)] for x in ("to_q", "to_k", "to_v")]
            out[key.replace("to_q", "qkv")] = torch.cat(parts).contiguous()
            continue
        key = (key.replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
               .replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_k.", ".attention.k_norm.")
               .replace(".attention.norm_q.", ".attention.q_norm."))
        out[key] = value
    path = Path(path)
    save_file(out, str(path))
    return path
