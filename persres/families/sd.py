"""SD 1.x and SD 2.x: `StableDiffusionPipeline`, a UNet with cross-attention, one CLIP text encoder.

- residuals: every `Transformer2DModel`'s proj_out (a 1x1 Conv2d on SD 1.x, a Linear on 2.x),
  the paper's layer (Ham et al., Sec. 3.2).
- training: the DDPM denoising loss (epsilon or v-prediction) at uniform timesteps.
- LAG: each block's cross-attention (attn2) through a persres kernel that returns the concept
  tokens' maps; under classifier-free guidance the batch is [unconditional, conditional].
- sampling: DDIM, 50 steps, guidance 6.0 (the paper's, Sec. 4).
"""

from __future__ import annotations

import re

from contextlib import contextmanager
from dataclasses import dataclass

from persres.families.base import Conditioning, Family


@dataclass(frozen=True, eq=False, repr=False)
class StableDiffusion(Family):
    """The UNet families' behaviour; SD 1.x and 2.x differ only in what they are told apart by."""

    linear_proj: bool = False  # SD 2.x: Linear proj_out (use_linear_projection)
    checkpoint_prefix: str = "model.diffusion_model."  # the tensor names that mark an original checkpoint

    def matches_config(self, config) -> bool:
        return is_unet_config(config) and bool(config.get("use_linear_projection")) == self.linear_proj \
            and config.get("addition_embed_type") != "text_time"

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return any(k.startswith(self.checkpoint_prefix) for k in keys)

    def matches_legacy_pack(self, meta) -> bool:
        return (meta.proj_out == "Linear") == self.linear_proj

    # --- loading ----------------------------------------------------------------------
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)

    def prepare(self, pipe) -> None:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def blocks(self, model) -> dict:
        return {name: module for name, module in model.named_modules()
                if hasattr(module, "transformer_blocks") and hasattr(module, "proj_out")}

    def block_names_in(self, keys) -> set[str]:
        keys = list(keys)
        blocks = {k.removesuffix(".proj_out.weight") for k in keys if k.endswith(".proj_out.weight")}
        return {b for b in blocks if any(k.startswith(f"{b}.transformer_blocks.") for k in keys)}

    def reads_text(self, path: str) -> bool:  # cross-attention keys and values read the text encoder's states
        return path.endswith((".attn2.to_k", ".attn2.to_v"))

    # --- text -------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        unet, tok = pipe.unet, pipe.tokenizer
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return Conditioning(pipe.text_encoder(ids.to(unet.device))[0].to(unet.dtype))

    # --- training ---------------------------------------------------------------------
    def objective(self, pipe, source, config):
        from persres.families.denoising import denoising_objective

        return denoising_objective(pipe.unet, source, config.batch_size, pipe.scheduler, config.snr_gamma)

    # --- sampling ---------------------------------------------------------------------
    def native_side(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def sampling_arguments(self, pipe, config) -> dict:
        return {"eta": config.eta}

    def lag_processors(self, model, session, backend, layers, latent_hw):
        from persres.kernels import Backend, KernelAttnProcessor, block_of, resolve_backend

        def make(name: str, old):
            if name.endswith("attn2.processor") and block_of(name) in layers:
                return KernelAttnProcessor(backend, session, block_of(name))
            # diffusers' default processor already is SDPA: keep it for self-attention then
            return old if resolve_backend(backend) is Backend.SDPA else KernelAttnProcessor(backend)

        return make

    @contextmanager
    def plain_attention(self, model, backend):
        from persres.kernels import Backend, attention_backend, resolve_backend

        if resolve_backend(backend) is Backend.SDPA:  # diffusers' default already is SDPA
            yield
            return
        with attention_backend(model, backend):
            yield

    def kohya_key(self, block: str, blocks) -> str:
        return kohya_name(block)

    def kohya_keys(self, block: str, blocks) -> set[str]:
        return {kohya_name(block), kohya_name(sgm_name(block, levels_depth(blocks)))}

    def kohya_layer_names(self, paths, blocks) -> dict[str, tuple[str, ...]]:  # the diffusers and the original layout
        out = super().kohya_layer_names(paths, blocks)
        for path in paths:
            original = self._original_key(path, blocks)
            if original:
                out["lora_unet_" + original.replace(".", "_")] = (path,)
        return out

    @staticmethod
    def _original_key(path: str, blocks) -> str | None:
        levels = {int(b.split(".")[1]) for b in blocks if b.startswith("up_blocks.")}
        try:
            return ldm_key(path + ".weight", levels_depth(blocks), levels).removesuffix(".weight")
        except KeyError:
            return None

    def needed_bytes(self, pipe, height: int, width: int, samples: int, training: bool) -> int:
        return unet_bytes(pipe, height, width, samples, training)


# The UNet memory estimate (`persres.sizes` says how it is used): activations grow with the latent
# pixels times the UNet's width, at these bytes per latent pixel and width unit in fp32, fitted to
# peak RSS of the toy model's UNet at 64-256 px (`python -m benchmarks.size_memory`).
TRAIN_BYTES = 160  # training: every activation kept for the backward pass
GEN_BYTES = 45  # sampling, per image and CFG half


def unet_width(config) -> float:
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    return sum(c * (2 * n + 1) / 4**level for level, (c, n) in enumerate(zip(channels, layers)))


def unet_bytes(pipe, height: int, width: int, samples: int, training: bool) -> int:
    """~ activation bytes of one UNet pass (with its backward when `training`) over `samples` latents."""
    import torch

    latent_pixels = (height // pipe.vae_scale_factor) * (width // pipe.vae_scale_factor)
    per_unit = TRAIN_BYTES if training else GEN_BYTES
    scale = pipe.unet.dtype.itemsize / torch.float32.itemsize
    return int(latent_pixels * samples * unet_width(pipe.unet.config) * per_unit * scale)


def is_unet_config(config) -> bool:
    return "block_out_channels" in config and "layers_per_block" in config


def kohya_name(block: str) -> str:
    """sd-scripts' name of a block's proj_out ('.' -> '_')."""
    return "lora_unet_" + f"{block}.proj_out".replace(".", "_")


def levels_depth(blocks) -> int:
    """L, the resnets per down level, from the blocks' names (up levels hold L + 1)."""
    down = [int(b.split(".")[3]) for b in blocks if b.startswith("down_blocks.")]
    if down:
        return max(down) + 1
    up = [int(b.split(".")[3]) for b in blocks if b.startswith("up_blocks.")]
    return max(up) if up else 1


def sgm_name(block: str, depth: int) -> str:
    """A diffusers transformer block's name in the original (SGM) UNet, e.g. 'input_blocks.4.1':
    down_blocks.i.attentions.j is input_blocks.(1 + i(L+1) + j).1, mid_block.attentions.0 is
    middle_block.1, up_blocks.i.attentions.j is output_blocks.(i(L+1) + j).1, for L resnets per
    down level (SDXL's kohya files name blocks so; SD 1.x/2.x files the diffusers way)."""
    parts = block.split(".")
    if parts[0] == "mid_block":
        return "middle_block.1"
    level, j = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return f"input_blocks.{1 + level * (depth + 1) + j}.1"
    return f"output_blocks.{level * (depth + 1) + j}.1"



SD1 = StableDiffusion("sd1", "SD 1.x", "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd_v1",
                      "stable-diffusion-v1", 512, comfyui_models=("SD15",))
SD2 = StableDiffusion("sd2", "SD 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1", "sd_v2",
                      "stable-diffusion-v2-512", 512, kohya_v2=True, v_modelspec="stable-diffusion-v2-768-v", linear_proj=True,
                      checkpoint_prefix="cond_stage_model.model.", comfyui_models=("SD20",))


def _resnet_to_ldm(key: str) -> str:
    for new, old in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        key = key.replace(f".{new}.", f".{old}.")
    return key


def ldm_key(key: str, depth: int, attention_levels: set[int]) -> str:
    """A diffusers UNet key in the original (LDM/SGM) layout; `depth` = layers_per_block,
    `attention_levels`: the up levels with cross-attention (their upsampler comes third).
    KeyError for a key the original layout names otherwise (SDXL's add_embedding)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, tail = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        out = f"input_blocks.{1 + level * (depth + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        return _resnet_to_ldm(out) if kind == "resnets" else out
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (depth + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        out = f"middle_block.{index}.{m[3]}"
        return _resnet_to_ldm(out) if m[1] == "resnets" else out
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        out = f"output_blocks.{level * (depth + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        return _resnet_to_ldm(out) if kind == "resnets" else out
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        level = int(m[1])
        return f"output_blocks.{level * (depth + 1) + depth}.{2 if level in attention_levels else 1}.conv.{m[2]}"
    raise KeyError(key)
