"""The model families persres runs on: one adapter per family, and the one place that tells them apart.

- `sd`: SD 1.x and SD 2.x (`StableDiffusionPipeline`; Conv2d or Linear proj_out, one CLIP encoder)
- `sdxl`: SDXL base (`StableDiffusionXLPipeline`; two encoders, pooled and size conditioning)
- `flux`: FLUX.1 (`FluxPipeline`; a diffusion transformer trained by flow matching, T5 + CLIP)
- `zimage`: Z-Image (`ZImagePipeline`; a single-stream diffusion transformer, a Qwen3 text encoder)
- `qwenimage`: Qwen-Image (`QwenImagePipeline`; a double-stream diffusion transformer, a Qwen2.5-VL text encoder)
- `flux2klein`, `flux2`: FLUX.2 klein and dev (`Flux2KleinPipeline`, a Qwen3 text encoder, true CFG;
  `Flux2Pipeline`, a Mistral Small 3 text encoder, guidance an input); one transformer

Each adapter (`base.Family`) answers everything persres needs to know about its family:
detection from a denoiser's config or a single file's tensor names, loading, the denoiser and
the blocks whose output projection carries the residual, text encoding and the tokenizer LAG
reads positions from, the training objective, the attention processors that return token
maps, native size, sampling and training defaults, LoRA names, the memory estimate.

The family is detected once, where a pipeline is loaded (`persres.models.load_pipeline`), and
travels with it (`of(pipe)`); a pipeline handed in from outside is detected on first use. The
family's key is recorded in every pack and the registry. Adding a family is one module here
plus its entry in `FAMILIES`.

This package imports no torch: the registry names families without loading a model library.
"""

from __future__ import annotations

from persres.families.base import Family
from persres.families.flux import FLUX1, FLUX_RANK_RATIO
from persres.families.flux2 import FLUX2_DEV, FLUX2_KLEIN
from persres.families.sd import SD1, SD2
from persres.families.sdxl import SDXL
from persres.families.qwenimage import QWEN_IMAGE
from persres.families.zimage import ZIMAGE

FAMILIES: dict[str, Family] = {f.key: f for f in (SD1, SD2, SDXL, FLUX1, ZIMAGE, QWEN_IMAGE, FLUX2_KLEIN, FLUX2_DEV)}
# The first whose rule matches a config, a checkpoint's tensor names or an old pack wins (an SDXL
# or FLUX.1 checkpoint also holds SD 1.x's tensor names; an SDXL pack is also Linear, as SD 2.x's;
# a FLUX.2 config or checkpoint also has FLUX.1's marks).
DETECTION: tuple[Family, ...] = (ZIMAGE, QWEN_IMAGE, FLUX2_KLEIN, FLUX2_DEV, FLUX1, SDXL, SD2, SD1)
PIPELINES = tuple(dict.fromkeys(f.pipeline for f in FAMILIES.values()))
ATTRIBUTE = "persres_family"  # where a loaded pipeline carries its family

__all__ = ["DETECTION", "FAMILIES", "FLUX_RANK_RATIO", "Family", "PIPELINES", "denoiser", "get", "label", "of", "of_checkpoint", "of_config",
           "of_comfyui", "of_meta", "of_pipeline_class"]


def get(key: str) -> Family:
    return FAMILIES[key]


def of_config(denoiser_config) -> Family:
    """The family of a denoiser's config (a dict or a diffusers FrozenDict): its architecture decides."""
    return next(f for f in DETECTION if f.matches_config(denoiser_config))


def of_checkpoint(keys) -> Family | None:
    """The family of an original-layout checkpoint from its tensor names, or None."""
    keys = list(keys)
    return next((f for f in DETECTION if f.matches_checkpoint(keys)), None)


def of_pipeline_class(class_name: str) -> Family | None:
    """A family whose pipeline class this is (SD 1.x and 2.x share one: the first is returned;
    the loaded denoiser's config then tells them apart)."""
    return next((f for f in DETECTION if f.pipeline == class_name), None)


def of(pipe) -> Family:
    """The family a pipeline carries, detected from its denoiser once if it carries none."""
    family = getattr(pipe, ATTRIBUTE, None)
    if family is None:
        model = getattr(pipe, "transformer", None)
        family = of_config((model if model is not None else pipe.unet).config)
        try:
            setattr(pipe, ATTRIBUTE, family)
        except AttributeError:  # an object that takes no attributes: detected again next time
            pass
    return family


def denoiser(pipe):
    """The pipeline's denoising network (a UNet or a diffusion transformer)."""
    return of(pipe).denoiser(pipe)


def of_meta(meta) -> Family:
    """A pack's family: recorded, or (packs older than the field) inferred from its blocks."""
    recorded = meta.family or meta.train_config.get("family")
    if recorded in FAMILIES:
        return FAMILIES[recorded]
    return next(f for f in DETECTION if f.matches_legacy_pack(meta))


def of_comfyui(config_name: str) -> Family | None:
    """The family of a ComfyUI model config (its `comfy.supported_models` class name), or None."""
    return next((f for f in FAMILIES.values() if config_name in f.comfyui_models), None)


def described(last: str = " or ") -> str:
    """The families persres runs, for messages: "SD 1.x, SD 2.x, SDXL, FLUX.1 or Z-Image"."""
    labels = [f.label for f in FAMILIES.values()]
    return ", ".join(labels[:-1]) + last + labels[-1]


def label(key: str | None) -> str:
    family = FAMILIES.get(key or "")
    return family.label if family is not None else key or "an unknown family"
