"""The attention of a single-stream joint-attention block through a persres kernel, with token maps.

A single-stream block attends over the joint sequence [T text tokens, N image tokens]. A
concept's map is the image queries' attention to the concept's T5 token columns, summed over
those tokens and averaged over heads, read off the fused kernel's log-sum-exp
(`persres.kernels.attention`: never a (T+N) x (T+N) matrix). The block's proj_out runs after
its attention, so LAG's mask is ready in the same transformer evaluation
(the family adapter of such a transformer installs this processor for `persres.lag.lag_regions`).
"""

from __future__ import annotations

from diffusers.models.embeddings import apply_rotary_emb

from persres.kernels.attention import Backend, attention, resolve_backend
from persres.kernels.processor import MapSink


class JointAttnProcessor:
    """A single-stream block's joint attention (diffusers' `FluxAttnProcessor` for a block without
    `encoder_hidden_states`), through a persres backend, handing its image queries' token maps to `sink`."""

    def __init__(self, backend: Backend | str | None, sink: MapSink, block: str, image_tokens: int):
        self.backend = resolve_backend(backend)
        self.sink = sink
        self.block = block
        self.image_tokens = image_tokens  # N: the last N positions of the joint sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("persres's LAG on joint attention runs on single-stream blocks without an attention mask")
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # (B, T+N, heads, d)
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, T+N, d)
        out, maps = attention(q, k, v, token_sets=self.sink.token_sets, backend=self.backend)
        self.sink.record(self.block, maps[..., -self.image_tokens:])  # (B, K, N): image queries only
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, T+N, heads * d)
