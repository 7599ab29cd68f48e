"""A prompt's conditioning for the UNet, as each family computes it (the pipeline's own encoders).

SD 1.x/2.x: one CLIP text encoder's hidden states. SDXL: both encoders' joint hidden states,
the pooled embedding and the size/crop conditioning (`added_cond_kwargs`), with a check that
both tokenizers place the prompt's tokens alike (a concept's maps are read by position).
FLUX.1: the T5 states (what its joint attention reads) and CLIP's pooled vector, T5 padded to
`max_text_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persres.errors import PromptError
from persres.families import family_of


def text_encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


def tokenizers(pipe) -> list:
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def max_text_tokens(pipe) -> int:
    """FLUX.1's T5 sequence length: its tokenizer's limit, at most FLUX.1-dev's 512 (what the
    pipeline pads to, so token positions are the same in training and sampling)."""
    return min(512, pipe.tokenizer_2.model_max_length)


@dataclass(frozen=True)
class Conditioning:
    """A prompt's conditioning for the UNet, computed once."""

    embedding: torch.Tensor  # (1, tokens, D); FLUX.1: the T5 states
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (1, P), time_ids (1, 6); FLUX.1: pooled_projections (1, P)

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
    if family_of(pipe) == "flux":
        model = pipe.transformer
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=model.device, num_images_per_prompt=1,
                                               max_sequence_length=max_text_tokens(pipe))
        return Conditioning(embeds.to(model.dtype), {"pooled_projections": pooled.to(model.dtype)})
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
