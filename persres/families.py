"""The model families persres runs on, and what differs between them.

- sd1: SD 1.x (`StableDiffusionPipeline`; Conv2d proj_out, CLIP ViT-L/14)
- sd2: SD 2.x, epsilon or v-prediction (`StableDiffusionPipeline`; Linear proj_out, OpenCLIP-H)
- sdxl: SDXL base (`StableDiffusionXLPipeline`; two text encoders, a pooled text embedding
  and size/crop conditioning through `added_cond_kwargs`)

The family is read from the UNet's config (the architecture decides, not a name), recorded in
every pack, and named whenever a pack meets a model it does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persres.errors import PromptError

LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
XL_PIPELINE = "StableDiffusionXLPipeline"
PIPELINES = ("StableDiffusionPipeline", XL_PIPELINE)


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
    if recorded in LABELS:
        return recorded
    if meta.proj_out == "Conv2d":
        return "sd1"
    return "sdxl" if set(meta.channels.values()) <= {640, 1280} and len(meta.channels) == 11 else "sd2"


def label(family: str | None) -> str:
    return LABELS.get(family or "", family or "an unknown family")


def text_encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


def tokenizers(pipe) -> list:
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


@dataclass(frozen=True)
class Conditioning:
    """A prompt's conditioning for the UNet, computed once."""

    embedding: torch.Tensor  # (1, tokens, D)
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (1, P), time_ids (1, 6)

    def expand(self, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        added = None if self.added is None else {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()}
        return self.embedding.expand(batch, -1, -1), added


def check_same_positions(pipe, prompt: str) -> None:
    """SDXL's two tokenizers must put every token of the prompt at the same position, or a
    concept's maps (read from the joint embedding) would point at the wrong words."""
    ids = [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True).input_ids for t in tokenizers(pipe)]
    lengths = [ids_.index(t.eos_token_id) if t.eos_token_id in ids_ else len(ids_) for ids_, t in zip(ids, tokenizers(pipe))]
    if any(i[: lengths[0]] != ids[0][: lengths[0]] for i in ids[1:]) or len(set(lengths)) > 1:
        raise PromptError(f"the model's two tokenizers split {prompt!r} differently; persres needs one token layout for both")


@torch.no_grad()
def encode(pipe, prompt: str, resolution: tuple[int, int]) -> Conditioning:
    """The conditioning sampling uses for `prompt` (the pipeline's own encoders), without guidance."""
    device = pipe.unet.device
    if family_of(pipe) != "sdxl":
        tok = pipe.tokenizer
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return Conditioning(pipe.text_encoder(ids.to(device))[0].to(pipe.unet.dtype))
    check_same_positions(pipe, prompt)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    h, w = resolution
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pipe.unet.dtype, device=device)  # original size, crop, target size
    return Conditioning(embeds.to(pipe.unet.dtype), {"text_embeds": pooled.to(pipe.unet.dtype), "time_ids": time_ids})
