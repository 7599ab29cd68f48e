"""A prompt's conditioning for the denoiser, computed once by its family's own encoders.

`Conditioning` (defined with the family adapters) holds what the denoiser reads: the text
states and the family's added inputs (pooled embeddings, size conditioning). How each family
fills it is its adapter's `encode` (`persres.families`).
"""

from __future__ import annotations

import torch

from persres import families
from persres.families.base import Conditioning  # noqa: F401  (what encode returns)


def text_encoders(pipe) -> list:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


@torch.no_grad()
def encode(pipe, prompt: str, resolution: tuple[int, int]) -> Conditioning:
    """The conditioning sampling uses for `prompt` (the pipeline's own encoders), without guidance."""
    return families.of(pipe).encode(pipe, prompt, resolution)
