"""The model families persres runs on, and everything that differs between them, in one table.

- sd1: SD 1.x (`StableDiffusionPipeline`; Conv2d proj_out, CLIP ViT-L/14)
- sd2: SD 2.x, epsilon or v-prediction (`StableDiffusionPipeline`; Linear proj_out, OpenCLIP-H)
- sdxl: SDXL base (`StableDiffusionXLPipeline`; two text encoders, a pooled text embedding
  and size/crop conditioning through `added_cond_kwargs`, see `persres.conditioning`)
- flux: FLUX.1 (`FluxPipeline`; a diffusion transformer, `FluxTransformer2DModel`, trained by
  flow matching; CLIP pooled + T5 text states; see `persres.flux`)

The family is read from the denoiser's config (the UNet's, or FLUX's transformer's: the
architecture decides, not a name), recorded in every pack, and named whenever a pack meets a
model it does not fit. This module imports no
torch: the registry names families without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass


FLUX_RANK_RATIO = 1 / 128  # FLUX.1's r = m / 128: the paper's share of the model's parameters (see FAMILIES)


@dataclass(frozen=True)
class Family:
    key: str  # what packs and the registry record
    label: str  # what messages say
    pipeline: str  # the diffusers pipeline class in model_index.json
    config_repo: str  # where diffusers' from_single_file reads this family's configs
    kohya_version: str  # sd-scripts' ss_base_model_version
    modelspec: str  # SAI model spec architecture (LoRAs append "/lora")
    resolution: int  # native training resolution, for exported metadata
    train_defaults: tuple[tuple[str, object], ...] = ()  # training settings the family recommends over the paper's
    guidance: float | None = None  # the family's sampling guidance where the paper's 6.0 does not fit


FAMILIES = {f.key: f for f in (
    Family("sd1", "SD 1.x", "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd_v1",
           "stable-diffusion-v1", 512),
    Family("sd2", "SD 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1", "sd_v2",
           "stable-diffusion-v2-512", 512),
    Family("sdxl", "SDXL", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl_base_v1-0",
           "stable-diffusion-xl-v1-base", 1024),
    # The paper's budget, not its ratio: r = 0.05 m gives 108 M parameters on FLUX.1-dev (0.91% of
    # its transformer); r = m / 128 = 24 gives 16.8 M, 0.141% of it, as the paper's 1,239,040 are
    # 0.144% of SD v1.4's UNet (tests/test_flux.py counts both on the real configs).
    # FLUX.1-dev is guidance-distilled: guidance is an input of the transformer, 3.5 its pipeline's default
    Family("flux", "FLUX.1", "FluxPipeline", "black-forest-labs/FLUX.1-dev", "flux1", "flux-1-dev", 1024,
           (("rank_ratio", FLUX_RANK_RATIO),), guidance=3.5),
)}
SD2_V_MODELSPEC = "stable-diffusion-v2-768-v"  # SD 2.x with v-prediction
LABELS = {k: f.label for k, f in FAMILIES.items()}
PIPELINES = tuple(dict.fromkeys(f.pipeline for f in FAMILIES.values()))


def family_of_config(unet_config) -> str:
    """sd1, sd2, sdxl or flux from a denoiser's config (a dict or a diffusers FrozenDict)."""
    if unet_config.get("num_single_layers") is not None:
        return "flux"
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def denoiser(pipe):
    """The pipeline's denoising network: the UNet, or FLUX's transformer."""
    model = getattr(pipe, "transformer", None)
    return model if model is not None else pipe.unet


def family_of(pipe) -> str:
    return family_of_config(denoiser(pipe).config)


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
