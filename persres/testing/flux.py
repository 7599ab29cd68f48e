"""A tiny FLUX.1 pipeline built in code (tests, offline demos), and FLUX.1-dev's transformer config.

`build_tiny_flux_pipeline(path)` saves a random-weights `FluxPipeline` (one double- and two
single-stream blocks, tiny CLIP and T5 encoders, a two-level VAE) with `save_pretrained`, so it
loads through the same `from_pretrained` path as black-forest-labs/FLUX.1-dev. Its T5
vocabulary holds the toy world's words but no identifiers: an identifier that is one CLIP token
is several T5 tokens, as a rare word is under the real T5 tokenizer (a T5 tokenizer made from a
list of pieces, offline, needs transformers 5). `build_wide_flux_pipeline` and
`save_original_layout` make a Black Forest Labs-layout single file for the single-file path.
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


def build_wide_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny pipeline with a transformer of FLUX.1's width (3072: 24 heads of 128, one double- and one
    single-stream block, 0.53 B parameters, bf16): the smallest whose Black Forest Labs-layout file
    diffusers converts (`save_original_layout`). Weights drawn directly (no per-layer init: seconds)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    parts = tiny_flux_components(seed)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    transformer = transformer.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    parts["transformer"] = transformer
    path = Path(path)
    FluxPipeline(**parts).save_pretrained(path)
    return path


def build_tiny_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed))
    path = Path(path)
    pipe.save_pretrained(path)
    return path


# diffusers FluxTransformer2DModel key -> Black Forest Labs' key (the inverse of diffusers'
# `convert_flux_transformer_checkpoint_to_diffusers`; q, k, v and the single blocks' MLP input are
# concatenated in `save_original_layout`)
_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer", "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.norm_q": "img_attn.norm.query_norm",
           "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm",
           "attn.norm_added_k": "txt_attn.norm.key_norm", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj"}
_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm", "proj_out": "linear2"}


def save_original_layout(transformer, path: str | Path) -> Path:
    """A FLUX transformer as one .safetensors file in Black Forest Labs' layout (flux1-dev.safetensors'
    names): what `FluxTransformer2DModel.from_single_file` converts back. diffusers' converter
    assumes FLUX.1's width (3072), so only a transformer of that width round-trips."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    out = {}

    def put(src: str, dst: str) -> None:
        out[f"{dst}.scale" if dst.endswith("_norm") else f"{dst}.weight"] = sd[f"{src}.weight"]  # RMSNorm: "scale"
        if f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"]

    for src, dst in _TOP.items():
        put(src, dst)
    shift_scale = lambda t: torch.cat(t.chunk(2, dim=0)[::-1])  # noqa: E731  (diffusers keeps scale first, BFL shift first)
    out["final_layer.adaLN_modulation.1.weight"] = shift_scale(sd["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = shift_scale(sd["norm_out.linear.bias"])
    for i in range(len(transformer.transformer_blocks)):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for a, b in _DOUBLE.items():
            put(f"{src}.{a}", f"{dst}.{b}")
        for part, names in (("img_attn.qkv", ("to_q", "to_k", "to_v")), ("txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in ("weight", "bias"):
                out[f"{dst}.{part}.{suffix}"] = torch.cat([sd[f"{src}.attn.{n}.{suffix}"] for n in names])
    for i in range(len(transformer.single_transformer_blocks)):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for a, b in _SINGLE.items():
            put(f"{src}.{a}", f"{dst}.{b}")
        for suffix in ("weight", "bias"):
            out[f"{dst}.linear1.{suffix}"] = torch.cat([sd[f"{src}.{n}.{suffix}"] for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    path = Path(path)
    save_file(out, str(path))
    return path
