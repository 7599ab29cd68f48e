"""Qwen-Image's joint attention through a persres kernel, with token maps (`QwenLagProcessor`).

A block attends over [T text tokens, N image tokens]. The text of a batch's rows may be padded
and masked (`encoder_hidden_states_mask`): rows that keep the same text columns run their own
attention over those columns and the image (exactly what the mask does), through the fused
kernel, and the image queries' maps of the concept's text columns go to the session.
"""

from __future__ import annotations

import torch

from persres.kernels.attention import Backend, attention, resolve_backend
from persres.kernels.processor import MapSink


class QwenLagProcessor:
    """`QwenDoubleStreamAttnProcessor2_0` through a persres backend, handing the image queries' token
    maps to `sink`; returns (image stream, text stream) as it does."""

    def __init__(self, backend: Backend | str | None, sink: MapSink, block: str, image_tokens: int):
        self.backend = resolve_backend(backend)
        self.sink = sink
        self.block = block
        self.image_tokens = image_tokens  # N: the last N positions of the joint sequence

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None or attention_mask is not None:
            raise NotImplementedError("persres's LAG on Qwen-Image runs on its joint attention, masked by encoder_hidden_states_mask only")
        head_dim = attn.inner_dim // attn.heads
        streams = []
        for x, to_q, to_k, to_v, norm_q, norm_k, freqs in (
            (encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k, 1),
            (hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, 0),
        ):
            q, k, v = (f(x).unflatten(-1, (-1, head_dim)) for f in (to_q, to_k, to_v))  # (B, L, heads, d)
            q = norm_q(q) if norm_q is not None else q
            k = norm_k(k) if norm_k is not None else k
            if image_rotary_emb is not None:
                q = apply_rotary_emb_qwen(q, image_rotary_emb[freqs], use_real=False)
                k = apply_rotary_emb_qwen(k, image_rotary_emb[freqs], use_real=False)
            streams.append((q, k, v))
        q, k, v = (torch.cat(parts, dim=1).transpose(1, 2) for parts in zip(*streams))  # (B, heads, T+N, d): [text, image]
        batch, text = q.shape[0], encoder_hidden_states.shape[1]
        kept = torch.ones(batch, text, dtype=torch.bool, device=q.device) if encoder_hidden_states_mask is None \
            else encoder_hidden_states_mask.bool()
        out = torch.empty_like(q)
        maps = q.new_zeros(batch, len(self.sink.token_sets), self.image_tokens, dtype=torch.float32)  # (B, K, N)
        for row_mask in torch.unique(kept, dim=0):
            rows = (kept == row_mask).all(dim=1).nonzero().flatten()
            columns = torch.cat([row_mask.nonzero().flatten(), torch.arange(text, k.shape[2], device=q.device)])
            at = {int(c): i for i, c in enumerate(columns[: int(row_mask.sum())])}  # a text position -> its kept column
            fits = all(p in at for s in self.sink.token_sets for p in s)
            sets = [[at[p] for p in s] for s in self.sink.token_sets] if fits else None
            o, m = attention(q[rows], k[rows][:, :, columns], v[rows][:, :, columns], token_sets=sets, backend=self.backend)
            out[rows] = o
            if m is not None:
                maps[rows] = m[..., -self.image_tokens:].float()
        self.sink.record(self.block, maps)
        hidden = out.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)  # (B, T+N, heads * d)
        image = attn.to_out[0](hidden[:, text:].contiguous())
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)
        return image, attn.to_add_out(hidden[:, :text].contiguous())
