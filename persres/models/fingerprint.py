"""What a pack records of its base model and is checked against: the architecture and the weights of
the residual-carrying projections."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Fingerprint:
    architecture: str  # transformer blocks, their channels and proj_out kind
    weights: str  # the proj_out weights themselves

    def short(self) -> str:
        return f"{self.architecture[:12]}/{self.weights[:12]}"


def fingerprint(unet) -> Fingerprint:
    """What packs record and are checked against: the model's architecture and its proj_out
    weights, the same whether it was loaded in fp32, fp16 or (by load_pipeline) bf16."""
    from persres.residuals import base_layer_of, block_channels, block_in_channels, projections

    source = getattr(unet, "persres_source_fingerprint", None)  # set by load_pipeline on a denoiser it cast
    if isinstance(source, Fingerprint):
        return source

    blocks = projections(unet)
    channels, ins = block_channels(unet), block_in_channels(unet)
    arch = [(name, channels[name], type(base_layer_of(layer)).__name__) + ((ins[name],) if name in ins else ())
            for name, layer in sorted(blocks.items())]
    arch_hash = hashlib.sha256(json.dumps(arch).encode()).hexdigest()
    weights = {}
    for name, layer in blocks.items():
        weight = getattr(layer, "_original_weight", None)  # unmerged, if residuals are folded in
        weights[name] = base_layer_of(layer).weight if weight is None else weight
    return Fingerprint(arch_hash, weights_digest(weights))


def weights_digest(proj_out: dict[str, torch.Tensor]) -> str:
    """`Fingerprint.weights`: the proj_out weights, by block name in sorted order, hashed
    rounded to fp16 so that the same checkpoint loaded in fp16 or fp32 has one fingerprint."""
    import torch

    h = hashlib.sha256()
    for name in sorted(proj_out):
        h.update(proj_out[name].detach().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()
