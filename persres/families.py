"""The model families persres runs on, and everything that differs between them, in one table.

- sd1: SD 1.x (`StableDiffusionPipeline`; Conv2d proj_out, CLIP ViT-L/14)
- sd2: SD 2.x, epsilon or v-prediction (`StableDiffusionPipeline`; Linear proj_out, OpenCLIP-H)
- sdxl: SDXL base (`StableDiffusionXLPipeline`; two text encoders, a pooled text embedding
  and size/crop conditioning through `added_cond_kwargs`, see `persres.conditioning`)

The family is read from the UNet's config (the architecture decides, not a name), recorded in
every pack, and named whenever a pack meets a model it does not fit. This module imports no
torch: the registry names families without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    key: str  # what packs and the registry record
    label: str  # what messages say
    pipeline: str  # the diffusers pipeline class in model_index.json
    config_repo: str  # where diffusers' from_single_file reads this family's configs
    kohya_version: str  # sd-scripts' ss_base_model_version
    modelspec: str  # SAI model spec architecture (LoRAs append "/lora")
    resolution: int  # native training resolution, for exported metadata


FAMILIES = {f.key: f for f in (
    Family("sd1", "SD 1.x", "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd_v1",
           "stable-diffusion-v1", 512),
    Family("sd2", "SD 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1", "sd_v2",
           "stable-diffusion-v2-512", 512),
    Family("sdxl", "SDXL", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl_base_v1-0",
           "stable-diffusion-xl-v1-base", 1024),
)}
SD2_V_MODELSPEC = "stable-diffusion-v2-768-v"  # SD 2.x with v-prediction
LABELS = {k: f.label for k, f in FAMILIES.items()}
XL_PIPELINE = FAMILIES["sdxl"].pipeline
PIPELINES = tuple(dict.fromkeys(f.pipeline for f in FAMILIES.values()))


def family_of_config(unet_config) -> str:
    """sd1, sd2 or sdxl from a UNet config (a dict or a diffusers FrozenDict)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def family_of(pipe) -> str:
    return family_of_config(pipe.unet.config)


def family_of_meta(meta) -> str:
    """A pack's family: recorded, or (packs older than the field) inferred from its blocks:
    Conv2d proj_out is SD 1.x; SDXL base has 11 blocks of 640/1280 channels; the rest SD 2.x."""
    recorded = meta.family or meta.train_config.get("family")
    if recorded in FAMILIES:
        return recorded
    if meta.proj_out == "Conv2d":
        return "sd1"
    return "sdxl" if set(meta.channels.values()) <= {640, 1280} and len(meta.channels) == 11 else "sd2"


def label(family: str | None) -> str:
    return LABELS.get(family or "", family or "an unknown family")
