"""Tiny FLUX.2 pipelines built in code (tests, offline demos), and FLUX.2's configs.

`build_tiny_flux2_klein_pipeline(path)` saves a random-weights `Flux2KleinPipeline` (one double- and
two single-stream blocks; a tiny Qwen3 with the 28 layers whose 9th, 18th and 27th hidden states the
pipeline stacks, and a chat tokenizer in which persres's identifiers are single tokens; a two-level
VAE with non-trivial batch-norm statistics) with `save_pretrained`, so it loads through the same
`from_pretrained` path as black-forest-labs/FLUX.2-klein-base-4B. `build_tiny_flux2_dev_pipeline`
does the same for `Flux2Pipeline`: a tiny Mistral 3 (31 text layers, a one-layer Pixtral vision tower)
and a Pixtral processor whose chat template frames the system message as Mistral's does.
"""

from __future__ import annotations

from pathlib import Path

import torch

# black-forest-labs/FLUX.2-dev transformer/config.json (Flux2Transformer2DModel's defaults)
FLUX2_DEV_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                                    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                                    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)
# black-forest-labs/FLUX.2-klein-4B and -base-4B transformer/config.json (Black Forest Labs' Klein4BParams)
FLUX2_KLEIN_4B_TRANSFORMER_CONFIG = {**FLUX2_DEV_TRANSFORMER_CONFIG, "num_layers": 5, "num_single_layers": 20,
                                     "num_attention_heads": 24, "joint_attention_dim": 7680, "guidance_embeds": False}
# ... -klein-9B (Klein9BParams)
FLUX2_KLEIN_9B_TRANSFORMER_CONFIG = {**FLUX2_DEV_TRANSFORMER_CONFIG, "num_layers": 8, "num_single_layers": 24,
                                     "num_attention_heads": 32, "joint_attention_dim": 12288, "guidance_embeds": False}
# FLUX.2's scheduler: FLUX.1's dynamic shifting, its μ passed by the pipeline (`compute_empirical_mu`)
FLUX2_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                              num_train_timesteps=1000, shift=3.0, time_shift_type="exponential", use_dynamic_shifting=True)
TEXT_TOKENS = 64  # the tiny tokenizers' model_max_length (the pipelines pad to it, at most 512)
TRAIN_RESOLUTION = 32  # px: the tiny models' training default (persres_defaults.json; FLUX.2's own is 1024)


def tiny_transformer(joint_attention_dim: int, guidance_embeds: bool, seed: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
                                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)


def tiny_vae(seed: int):
    """Two levels (factor 2), 4 latent channels; batch-norm statistics (16 patch channels) away from 0 and 1."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=16, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             use_quant_conv=False, use_post_quant_conv=False)
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.25 + 2 * torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae


def tiny_flux2_klein_components(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from persres.testing.chat import chat_tokenizer
    from persres.toy import world

    tokenizer = chat_tokenizer(world.vocabulary(), TEXT_TOKENS)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), vae=tiny_vae(seed), text_encoder=text_encoder,
                tokenizer=tokenizer, transformer=tiny_transformer(3 * 16, False, seed))


def build_tiny_flux2_klein_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny klein pipeline saved as a diffusers directory, trained at `TRAIN_RESOLUTION` by default."""
    from diffusers import Flux2KleinPipeline

    from persres.testing import save_tiny_pipeline

    return save_tiny_pipeline(Flux2KleinPipeline(**tiny_flux2_klein_components(seed), is_distilled=False), path, TRAIN_RESOLUTION)



def tiny_flux2_dev_components(seed: int = 0):
    """A tiny Mistral 3 (30 text layers: the pipeline stacks the 10th, 20th and 30th hidden states) whose
    tokenizer holds the words of the pipeline's system message, so the frame is short, as the real one."""
    import re

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from persres.testing.chat import mistral_tokenizer
    from persres.toy import world

    tokenizer = mistral_tokenizer([*world.vocabulary(), *re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)], 2 * TEXT_TOKENS)
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=8, patch_size=4, image_size=32),
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.unk_token_id, spatial_merge_size=2))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), vae=tiny_vae(seed), text_encoder=text_encoder,
                tokenizer=tokenizer, transformer=tiny_transformer(3 * 16, True, seed))


def build_tiny_flux2_dev_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny dev pipeline saved as a diffusers directory, trained at `TRAIN_RESOLUTION` by default."""
    from diffusers import Flux2Pipeline

    from persres.testing import save_tiny_pipeline

    return save_tiny_pipeline(Flux2Pipeline(**tiny_flux2_dev_components(seed)), path, TRAIN_RESOLUTION)


NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
         "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def save_original_layout(transformer, path: str | Path) -> Path:
    """A FLUX.2 transformer as one .safetensors file in Black Forest Labs' layout, what ComfyUI loads as a
    diffusion model (double blocks' q/k/v fused, single blocks' `linear1` / `linear2`, norms as `.scale`,
    the final modulation's shift and scale in BFL's order): what `Flux2Transformer2DModel.from_single_file`
    converts back."""
    from safetensors.torch import save_file

    from persres.families.flux import original_layer_names
    from persres.families.flux2 import BFL_LAYERS

    state = {k: v.detach() for k, v in transformer.state_dict().items()}
    layers = {k.rsplit(".", 1)[0] for k in state}
    out = {}
    for name, targets in original_layer_names(BFL_LAYERS, layers).items():
        for kind in ("weight", "bias"):
            if f"{targets[0]}.{kind}" in state:
                out[f"{name}.{kind}"] = torch.cat([state.pop(f"{t}.{kind}") for t in targets])
    for key in [k for k in state if ".norm_" in k]:
        block, rest = key.split(".attn.")
        i = block.split(".")[1]
        if block.startswith("single_"):
            out[f"single_blocks.{i}.norm.{rest.split('.')[0].replace('norm_q', 'query_norm').replace('norm_k', 'key_norm')}.scale"] = state.pop(key)
        else:
            out[f"double_blocks.{i}.{NORMS['attn.' + rest.split('.')[0]]}.scale"] = state.pop(key)
    shift_scale = state.pop("norm_out.linear.weight")  # diffusers keeps (scale, shift); BFL (shift, scale)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat(shift_scale.chunk(2)[::-1])
    if state:
        raise ValueError(f"no original name for {sorted(state)[:4]}")
    path = Path(path)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path
