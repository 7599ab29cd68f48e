"""A prompt's conditioning for the denoiser, computed once by its family's own encoders.

`Conditioning` holds what the denoiser reads: the text states (CLIP's on SD 1.x/2.x, both
encoders' joint states on SDXL, T5's on FLUX.1) and the family's added inputs (SDXL's pooled
embedding and size conditioning, FLUX.1's pooled vector). How each family fills it is its
adapter's `encode` (`persres.families`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persres import families


def text_encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


@dataclass(frozen=True)
class Conditioning:
    """A prompt's conditioning for the denoiser, computed once."""

    embedding: torch.Tensor  # (1, tokens, D); FLUX.1: the T5 states
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (1, P), time_ids (1, 6); FLUX.1: pooled_projections (1, P)

    def expand(self, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        added = None if self.added is None else {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()}
        return self.embedding.expand(batch, -1, -1), added


@torch.no_grad()
def encode(pipe, prompt: str, resolution: tuple[int, int]) -> Conditioning:
    """The conditioning sampling uses for `prompt` (the pipeline's own encoders), without guidance."""
    return families.of(pipe).encode(pipe, prompt, resolution)
