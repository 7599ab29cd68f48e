"""FLUX.2's single-stream ("parallel") block attention through a persres kernel, with token maps
(`Flux2LagProcessor`).

A single-stream block projects the joint sequence [T text, N image] once into q, k, v and the MLP's
input (`to_qkv_mlp_proj`), attends, and projects the attention's output and the MLP's hidden states
together (`to_out`, where the residual sits). The attention runs through the fused kernel, and the
image queries' maps of the concept's text columns go to the session before `to_out` runs.
"""

from __future__ import annotations

import torch

from persres.kernels.attention import Backend, attention, resolve_backend
from persres.kernels.processor import MapSink


class Flux2LagProcessor:
    """diffusers' `Flux2ParallelSelfAttnProcessor` through a persres backend, handing the image queries'
    token maps to `sink`."""

    def __init__(self, backend: Backend | str | None, sink: MapSink, block: str, image_tokens: int):
        self.backend = resolve_backend(backend)
        self.sink = sink
        self.block = block
        self.image_tokens = image_tokens  # N: the last N positions of the joint sequence

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise NotImplementedError("persres's LAG on FLUX.2 runs its single-stream attention without an attention mask")
        fused = attn.to_qkv_mlp_proj(hidden_states)  # (B, T+N, 3 inner + 2 mlp)
        qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))  # (B, T+N, heads, d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out, maps = attention(*(t.transpose(1, 2) for t in (q, k, v)), token_sets=self.sink.token_sets, backend=self.backend)
        self.sink.record(self.block, maps[..., -self.image_tokens:])  # (B, K, N): image queries only
        hidden = out.transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, T+N, inner)
        return attn.to_out(torch.cat([hidden, attn.mlp_act_fn(mlp)], dim=-1))
