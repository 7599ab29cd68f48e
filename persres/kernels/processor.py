"""A diffusers attention processor that runs `persres.kernels.attention`.

It follows diffusers' `AttnProcessor2_0` step for step, with two differences: the core
attention goes through a chosen backend, and, when a `MapSink` is attached to a
cross-attention module, the token-summed maps of the sink's token sets are handed to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Protocol

import torch

from persres.kernels.attention import Backend, attention, resolve_backend


class MapSink(Protocol):
    """Receives a cross-attention module's token maps (see `persres.lag.LagSession`)."""

    token_sets: Sequence[Sequence[int]]

    def record(self, block: str, maps: torch.Tensor) -> None: ...


class KernelAttnProcessor:
    def __init__(self, backend: Backend | str | None = None, sink: MapSink | None = None, block: str | None = None):
        self.backend = resolve_backend(backend)
        self.sink = sink
        self.block = block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, HW, C)
        is_cross = encoder_hidden_states is not None
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nq, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nk, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        dtype = query.dtype
        if getattr(attn, "upcast_attention", False):  # some UNets set it: fp16 scores overflow otherwise
            query, key, value = query.float(), key.float(), value.float()
        wants_maps = self.sink is not None and is_cross and attention_mask is None
        if attention_mask is not None:  # masks are rare in SD; the plain SDPA path handles them
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
            maps = None
        else:
            out, maps = attention(
                query, key, value, token_sets=self.sink.token_sets if wants_maps else None,
                backend=self.backend, scale=attn.scale,
            )
        if maps is not None:
            self.sink.record(self.block, maps)  # (B, S, Nq)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(dtype)  # (B, Nq, C)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def block_of(processor_name: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor' -> 'down_blocks.0.attentions.0'"""
    return processor_name.split(".transformer_blocks.")[0]


@contextmanager
def attention_processors(unet, make):
    """Install `make(name, old_processor)` for every attention module ("{module path}.processor", as
    diffusers names them), restore the old ones after. Any module with `set_processor` counts: a
    model without diffusers' `attn_processors` (Z-Image's transformer) is walked the same way."""
    modules = {f"{name}.processor": m for name, m in unet.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}
    old = {name: m.processor for name, m in modules.items()}
    for name, m in modules.items():
        m.set_processor(make(name, old[name]))
    try:
        yield
    finally:
        for name, m in modules.items():
            m.set_processor(old[name])


@contextmanager
def attention_backend(unet, backend: Backend | str | None):
    """Run every attention module of `unet` through `backend` inside the block."""
    chosen = resolve_backend(backend)
    with attention_processors(unet, lambda name, old: KernelAttnProcessor(chosen)):
        yield
