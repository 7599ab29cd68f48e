"""Attention that also returns token-summed attention maps, behind explicit backends.

    out, maps = attention(q, k, v, token_sets=[(5, 6), (9,)], backend=Backend.SDPA)
    # q: (B, heads, Nq, d); k, v: (B, heads, Nk, d)
    # out: (B, heads, Nq, d); maps: (B, S, Nq), the softmax probabilities of each token set's
    # key columns summed over the set and averaged over heads (None without token sets)

Backends: `reference` (plain math, what every other backend is tested against), `sdpa`
(PyTorch's scaled_dot_product_attention, CPU and CUDA; the default) and `xformers`
(memory-efficient attention, optional extra, CUDA only; chosen by "auto" when it can run).

With token sets, `sdpa` and `xformers` still run their fused kernel, asking it for the
log-sum-exp of each query's logits as well; the maps then need only the token sets' own
columns: p_ij = exp(q_i . k_j * scale - lse_i) for j in the sets, never a softmax over all
keys and never an Nq x Nk matrix. `sdpa` gets the log-sum-exp from PyTorch's fused kernel
where one exposes it (`_scaled_dot_product_flash_attention_for_cpu` on the CPU,
`_scaled_dot_product_efficient_attention` on CUDA) and otherwise computes it in plain
torch (`lse_attention(..., fused=False)`); every path is checked against `reference`.
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


def maps_from_lse(q, k, lse, token_sets: TokenSets, scale: float) -> torch.Tensor:
    """Token-summed maps from a kernel's log-sum-exp, touching only the sets' key columns.

    q: (B, heads, Nq, d); k: (B, heads, Nk, d); lse: (B, heads, Nq) -> maps: (B, S, Nq)"""
    cols = sorted({j for cols in token_sets for j in cols})
    logits = (q.float() @ k[..., cols, :].float().transpose(-1, -2)) * scale  # (B, heads, Nq, C)
    probs = torch.exp(logits - lse.float().unsqueeze(-1))
    at = {j: i for i, j in enumerate(cols)}
    per_set = [probs[..., [at[j] for j in s]].sum(dim=-1) for s in token_sets]  # S x (B, heads, Nq)
    return torch.stack(per_set, dim=1).mean(dim=2)


def token_maps(q, k, token_sets: TokenSets, scale: float | None = None) -> torch.Tensor:
    """The token-summed maps alone, for attention another module computes (a host's own): the
    log-sum-exp in plain torch, then `maps_from_lse`. q: (B, heads, Nq, d); k: (B, heads, Nk, d) -> (B, S, Nq)"""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # (B, heads, Nq)
    return maps_from_lse(q, k, lse, token_sets, scale)


def _torch_lse(q, k, v, scale: float):
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # (B, heads, Nq)
    return out, lse


def _fused_lse(q, k, v, scale: float):
    """(out, lse) from PyTorch's own fused kernel, or None where none exposes it here."""
    aten = torch.ops.aten
    if q.device.type == "cpu" and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    if q.device.type == "cuda" and hasattr(aten, "_scaled_dot_product_efficient_attention"):
        try:
            out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        except RuntimeError:  # a head size or dtype this GPU's kernel does not take: the plain-torch path
            return None
        return out, lse[..., : q.shape[-2]]  # the kernel pads the query axis
    return None


def lse_attention(q, k, v, token_sets: TokenSets, scale: float | None, *, fused: bool = True):
    """SDPA's output and maps from the log-sum-exp; `fused=False` forces the plain-torch path."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    got = _fused_lse(q, k, v, scale) if fused else None
    out, lse = got if got is not None else _torch_lse(q, k, v, scale)
    return out, maps_from_lse(q, k, lse, token_sets, scale)


def _sdpa(q, k, v, token_sets: TokenSets, scale: float | None):
    if token_sets:
        return lse_attention(q, k, v, token_sets, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def _xformers(q, k, v, token_sets: TokenSets, scale: float | None):
    import xformers.ops as xops

    # xformers wants (B, N, heads, d)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not token_sets:
        return xops.memory_efficient_attention(qt, kt, vt, scale=scale).transpose(1, 2), None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = xops.memory_efficient_attention_forward_requires_grad(qt, kt, vt, scale=scale)
    lse = lse[..., : q.shape[-2]]  # (B, heads, Nq): some kernels pad the query axis
    return out.transpose(1, 2), maps_from_lse(q, k, lse, token_sets, scale)


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
