"""Z-Image's joint attention through a persres kernel, with token maps (`ZImageLagProcessor`).

A main layer attends over one sequence per image, [N image tokens, padding to a multiple of 32,
T text tokens]; rows of a batch whose prompts differ in length (the conditional and unconditional
prompts under guidance) are padded at the end and masked. Each length runs its own attention
over its own keys (exactly what the mask does), through the fused kernel, and the conditional
rows hand the image queries' maps of the concept's text columns to the session.
"""

from __future__ import annotations

import torch

from persres.families.zimage import SEQ_MULTI_OF
from persres.kernels.attention import Backend, attention, resolve_backend
from persres.kernels.processor import MapSink


def rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (B, L, heads, d) rotated by the complex frequencies freqs: (B, L, d/2), as Z-Image rotates."""
    turned = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2)
    return torch.view_as_real(turned).flatten(3).type_as(x)


class ZImageLagProcessor:
    """`ZSingleStreamAttnProcessor` through a persres backend, handing the image queries' token maps
    (text columns offset past the padded image tokens) to `sink`."""

    def __init__(self, backend: Backend | str | None, sink: MapSink, block: str, image_tokens: int):
        self.backend = resolve_backend(backend)
        self.sink = sink
        self.block = block
        self.image_tokens = image_tokens  # N: the first N positions of every row
        self.text_start = image_tokens + (-image_tokens) % SEQ_MULTI_OF

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        heads = attn.heads
        query = attn.to_q(hidden_states).unflatten(-1, (heads, -1))  # (B, L, heads, d)
        key = attn.to_k(hidden_states).unflatten(-1, (heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotary(query, freqs_cis), rotary(key, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, L, d)
        batch, length = q.shape[0], q.shape[2]
        lengths = [length] * batch if attention_mask is None else attention_mask.reshape(batch, -1).sum(-1).tolist()
        sets = [[self.text_start + p for p in s] for s in self.sink.token_sets]
        out = torch.empty_like(q)
        maps = q.new_zeros(batch, len(sets), self.image_tokens, dtype=torch.float32)  # (B, K, N)
        for n in sorted(set(lengths)):
            rows = [i for i, m in enumerate(lengths) if m == n]
            fits = all(c < n for s in sets for c in s)  # the concept's columns are in these rows' prompt
            o, m = attention(q[rows], k[rows, :, :n], v[rows, :, :n], token_sets=sets if fits else None, backend=self.backend)
            out[rows] = o
            if m is not None:
                maps[rows] = m[..., : self.image_tokens].float()
        self.sink.record(self.block, maps)
        hidden = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, L, heads * d)
        hidden = attn.to_out[0](hidden)
        return attn.to_out[1](hidden) if len(attn.to_out) > 1 else hidden
