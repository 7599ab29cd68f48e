"""A tiny Qwen-Image pipeline built in code (tests, offline demos), and Qwen-Image's configs.

`build_tiny_qwenimage_pipeline(path)` saves a random-weights `QwenImagePipeline` (two double-stream
blocks, a tiny Qwen2.5-VL text encoder with a chat tokenizer in which persres's identifiers and the
words of the pipeline's system message are single tokens, so its template prefix is 34 tokens as
with the real tokenizer; a one-level video VAE) with `save_pretrained`, so it loads through the
same `from_pretrained` path as Qwen/Qwen-Image.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen/Qwen-Image transformer/config.json (QwenImageTransformer2DModel's defaults)
QWEN_IMAGE_TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                                     num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                                     axes_dims_rope=(16, 56, 56))
# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                                   num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                                   use_dynamic_shifting=True)
TEXT_TOKENS = 96  # the tiny tokenizer's model_max_length (the pipeline reads up to 1024 + 34 itself)
TRAIN_RESOLUTION = 32  # px: the tiny model's training default (persres_defaults.json; Qwen-Image's own is 1024)


# the words of QwenImagePipeline's system message (`prompt_template_encode`), single tokens in the tiny tokenizer
SYSTEM_WORDS = ("Describe", "detailing", "color", "shape", "size", "texture", "quantity", "text", "spatial", "relationships",
                "objects", "background")


def tiny_qwenimage_components(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from persres.testing.chat import chat_tokenizer
    from persres.toy import world

    tokenizer = chat_tokenizer([*world.vocabulary(), *SYSTEM_WORDS], TEXT_TOKENS)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **special),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **special))
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_tiny_qwenimage_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny pipeline saved as a diffusers directory, with a persres_defaults.json that trains it at
    `TRAIN_RESOLUTION` (where no --resolution is given: the web app, train-many)."""
    from diffusers import QwenImagePipeline

    from persres.testing import save_tiny_pipeline

    return save_tiny_pipeline(QwenImagePipeline(**tiny_qwenimage_components(seed)), path, TRAIN_RESOLUTION)
