"""Attention that also returns token-summed attention maps, behind explicit backends.

    out, maps = attention(q, k, v, token_sets=[(5, 6), (9,)], backend=Backend.SDPA)
    # q: (B, heads, Nq, d); k, v: (B, heads, Nk, d)
    # out: (B, heads, Nq, d); maps: (B, S, Nq), the softmax probabilities of each token set's
    # key columns summed over the set and averaged over heads (None without token sets)

Backends: `reference` (plain math, what every other backend is tested against), `sdpa`
(PyTorch's scaled_dot_product_attention, CPU and CUDA; the default) and `xformers`
(memory-efficient attention, optional extra, CUDA only; chosen by "auto" when it can run).
With token sets, attention is
cross-attention over the text's few keys: the probabilities are formed explicitly once and
serve both the output and the maps, so no second QK^T is computed. Without token sets the
fused kernels run and no Nq x Nk matrix is materialized.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from persres.errors import BackendUnavailable

TokenSets = Sequence[Sequence[int]]


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    SDPA = "sdpa"
    XFORMERS = "xformers"


def _token_maps(probs: torch.Tensor, token_sets: TokenSets) -> torch.Tensor:
    # probs: (B, heads, Nq, Nk) -> maps: (B, S, Nq)
    per_set = [probs[..., list(cols)].sum(dim=-1) for cols in token_sets]  # S x (B, heads, Nq)
    return torch.stack(per_set, dim=1).mean(dim=2)


def _explicit(q, k, v, token_sets: TokenSets, scale: float | None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale  # (B, heads, Nq, Nk)
    probs = logits.float().softmax(dim=-1)
    out = (probs.to(v.dtype) @ v)  # (B, heads, Nq, d)
    maps = _token_maps(probs, token_sets) if token_sets else None
    return out, maps


def _reference(q, k, v, token_sets: TokenSets, scale: float | None):
    out, maps = _explicit(q.float(), k.float(), v.float(), token_sets, scale)
    return out.to(q.dtype), maps


def _sdpa(q, k, v, token_sets: TokenSets, scale: float | None):
    if token_sets:
        return _explicit(q, k, v, token_sets, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def _xformers(q, k, v, token_sets: TokenSets, scale: float | None):
    if token_sets:
        return _explicit(q, k, v, token_sets, scale)
    import xformers.ops as xops

    # xformers wants (B, N, heads, d)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), None


def _xformers_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None


_BACKENDS: dict[Backend, tuple[Callable, Callable[[], bool]]] = {
    Backend.REFERENCE: (_reference, lambda: True),
    Backend.SDPA: (_sdpa, lambda: True),
    Backend.XFORMERS: (_xformers, _xformers_available),
}


def available_backends() -> list[Backend]:
    return [b for b, (_, ok) in _BACKENDS.items() if ok()]


def resolve_backend(backend: Backend | str | None) -> Backend:
    """`None`/"auto" picks xformers where it runs (CUDA, installed), else SDPA; a named
    backend that cannot run here is an error."""
    if backend in (None, "auto"):
        return Backend.XFORMERS if _xformers_available() else Backend.SDPA
    try:
        chosen = Backend(backend)
    except ValueError:
        names = ", ".join(b.value for b in Backend)
        raise BackendUnavailable(f"unknown attention backend {backend!r} (choose from auto, {names})") from None
    if not _BACKENDS[chosen][1]():
        raise BackendUnavailable(f"attention backend {chosen.value!r} is not available here (xformers needs CUDA and `pip install persres[xformers]`)")
    return chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    token_sets: TokenSets | None = None,
    backend: Backend | str | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    fn = _BACKENDS[resolve_backend(backend)][0]
    return fn(q, k, v, token_sets or (), scale)
