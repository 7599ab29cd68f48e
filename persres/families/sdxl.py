"""SDXL base: `StableDiffusionXLPipeline`, SD's UNet behaviour with two text encoders.

- text: both encoders' joint hidden states, the pooled embedding and the size/crop
  conditioning (`added_cond_kwargs`); both tokenizers must place a prompt's tokens alike,
  since a concept's maps are read by position.
- kohya files name its blocks the original (SGM) way (`sd.sgm_name`), as sd-scripts writes
  and ComfyUI's key map reads them; import accepts both namings, as on SD 1.x/2.x.
"""

from __future__ import annotations

from dataclasses import dataclass

from persres.families.base import Conditioning
from persres.families.sd import StableDiffusion, is_unet_config, kohya_name, levels_depth, sgm_name

TEXT_TIME = "text_time"  # the UNet config's addition_embed_type on SDXL


@dataclass(frozen=True, eq=False, repr=False)
class StableDiffusionXL(StableDiffusion):
    def matches_config(self, config) -> bool:
        return is_unet_config(config) and config.get("addition_embed_type") == TEXT_TIME

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return any(k.startswith("conditioner.embedders.1.") for k in keys)

    def matches_legacy_pack(self, meta) -> bool:  # SDXL base: 11 blocks of 640/1280 channels
        return meta.proj_out == "Linear" and set(meta.channels.values()) <= {640, 1280} and len(meta.channels) == 11

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline, dict(add_watermarker=False)

    def check_concept_prompt(self, pipe, prompt: str) -> None:
        from persres.errors import PromptError

        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        ids = [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True).input_ids for t in tokenizers]
        lengths = [ids_.index(t.eos_token_id) if t.eos_token_id in ids_ else len(ids_) for ids_, t in zip(ids, tokenizers)]
        if any(i[: lengths[0]] != ids[0][: lengths[0]] for i in ids[1:]) or len(set(lengths)) > 1:
            raise PromptError(f"the model's two tokenizers split {prompt!r} differently; persres needs one token layout for both")

    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        import torch

        self.check_concept_prompt(pipe, prompt)
        unet = pipe.unet
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        h, w = resolution
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=unet.dtype, device=unet.device)  # original size, crop, target size
        return Conditioning(embeds.to(unet.dtype), {"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids})

    def kohya_key(self, block: str, blocks) -> str:
        return kohya_name(sgm_name(block, levels_depth(blocks)))

    def kohya_layer_key(self, path: str, blocks) -> str:  # sd-scripts names SDXL's layers the original way
        return "lora_unet_" + (self._original_key(path, blocks) or path).replace(".", "_")


SDXL = StableDiffusionXL("sdxl", "SDXL", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl_base_v1-0",
                         "stable-diffusion-xl-v1-base", 1024, implementation="https://github.com/Stability-AI/generative-models",
                         linear_proj=True, kohya_text_prefixes=(("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")),
                         sequence_encoders=(("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
                         comfyui_models=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"))
