"""A tiny FLUX.1 pipeline built in code (tests, offline demos), and FLUX.1-dev's transformer config.

`build_tiny_flux_pipeline(path)` saves a random-weights `FluxPipeline` (two-block transformer,
tiny CLIP and T5 encoders, a two-level VAE) with `save_pretrained`, so it loads through the
same `from_pretrained` path as black-forest-labs/FLUX.1-dev. Its T5 vocabulary holds the toy
world's words but no identifiers: an identifier that is one CLIP token is several T5 tokens,
as a rare word is under the real T5 tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
T5_MAX_TOKENS = 48  # the tiny T5 tokenizer's model_max_length (FLUX.1-dev: 512)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)


def build_t5_tokenizer(words):
    """A T5 (Unigram) tokenizer whose vocabulary is `words` and single characters, offline."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -12.0)]
    pieces += [(f"▁{w}", -1.0 - i * 1e-3) for i, w in enumerate(dict.fromkeys(words))]
    pieces += [(c, -20.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_TOKENS)


def tiny_flux_components(seed: int = 0):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from persres.toy import world
    from persres.toy.vocabulary import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer_2 = build_t5_tokenizer(world.vocabulary())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length))
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_layers=2,
                                             num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    return dict(scheduler=flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_tiny_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed))
    path = Path(path)
    pipe.save_pretrained(path)
    return path
