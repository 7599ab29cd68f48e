"""LAG on a ComfyUI model, through ComfyUI's own patch points, undone with the model clone.

    patched = LagPatch(tokens, strengths, everywhere).apply(model, changes, transformers)
    # changes: {"diffusion_model.input_blocks.1.1.proj_out": {concept: (A (m, r), B (r, n[, kh, kw]))}, ...}

- Every changed layer gets an object patch on its `forward` (`LagForward`): ComfyUI's own forward
  first (its weight casting and weight patches, another LoRA loader's included, untouched), then
  Σ_k s_k M_k ⊙ (A_k B_k x) with the masks of this sampling's `persres.lag.LagSession`.
- Every transformer layer's cross-attention goes through the attn2 replacement slot (`MapsAttention`):
  ComfyUI hands it q, k, v; it returns the attention and gives the session the token maps of the
  same kernel call. A replacement another node pack put there first is chained: it still computes
  the output, the maps are computed beside it.
- An outer-sample wrapper opens a session per sampling call (steps from the sigmas, the latent
  grid from the noise) and keeps each concept's region for `PersresRegions`; a diffusion-model
  wrapper tells the session each evaluation's step and batch layout (`cond_or_uncond`).
One denoiser evaluation per step, as in persres's own sampling: this is the same `LagSession`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from persres.comfyui import NODE_PACK
from persres.config import MultiLagConfig
from persres.kernels.attention import attention, token_maps
from persres.lag import ConceptTokens, LagSession
from persres.residuals import EVERYWHERE, residual_sum

Factors = tuple[torch.Tensor, torch.Tensor]  # A (m, r), B (r, n[, kh, kw]), fp32, alpha / r folded into A


class LagPatch:
    """One node's concepts on one ComfyUI model: the per-call `LagSession` and the regions it kept.

    Shared, never copied: ComfyUI deep-copies model options on every clone, and every patch it holds
    must keep reading the one session of this sampling call."""

    def __init__(self, tokens: Sequence[ConceptTokens], strengths: Mapping[str, float], everywhere: Sequence[str] = (),
                 multi: MultiLagConfig = MultiLagConfig(), backend: str | None = None):
        self.tokens = list(tokens)
        self.strengths = dict(strengths)
        self.everywhere = list(everywhere)
        self.multi = multi
        self.backend = backend
        self.session: LagSession | None = None  # set only while ComfyUI samples with this model
        self.masks: dict[str, torch.Tensor] = {}  # concept -> (b, h, w) in [0, 1], from the last sampling call

    def __deepcopy__(self, memo):
        return self

    def apply(self, model, changes: Mapping[str, Mapping[str, Factors]], transformers: Mapping[tuple, tuple[str, int]],
              family) -> object:
        """A clone of ComfyUI's `model` (a ModelPatcher) with LAG's patches; `model` itself is untouched.
        `transformers`: ComfyUI's attn2 slot (kind, number) -> (the transformer's module path, its layers)."""
        from comfy.patcher_extension import WrappersMP

        patched = model.clone()
        blocks = sorted((path for path, _ in transformers.values()), key=len, reverse=True)
        for path, factors in changes.items():
            block = next((b for b in blocks if path.startswith(b + ".")), "")
            layer = patched.get_model_object(path)
            inner = patched.get_model_object(f"{path}.forward")
            lag_forward = LagForward(self, inner, factors, block=block, proj_out=path == f"{block}.proj_out",
                                     text=family.reads_text(path), conv=layer if isinstance(layer, nn.Conv2d) else None)
            patched.add_object_patch(f"{path}.forward", lag_forward)
        replaced = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
        for (kind, number), (path, depth) in transformers.items():
            for index in range(depth):
                inner = replaced.get((kind, number, index), replaced.get((kind, number)))
                patched.set_model_attn2_replace(MapsAttention(self, path, inner), kind, number, index)
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, NODE_PACK, self.outer_sample)
        patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, NODE_PACK, self.diffusion_model)
        patched.set_attachments(NODE_PACK, self)
        return patched

    @contextmanager
    def sampling(self, steps: int, latent_hw: tuple[int, int]):
        """One sampling call's session; its regions are kept in `masks` when it ends."""
        session = LagSession(self.tokens, guided=True, latent_hw=latent_hw, keep_masks=True, multi=self.multi,
                             steps=steps, everywhere=self.everywhere)
        self.session = session
        try:
            yield session
            session.end_evaluation()
            self.masks = session.average_masks()
        finally:
            self.session = None

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        with self.sampling(max(1, sigmas.shape[-1] - 1), tuple(noise.shape[-2:])):
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def diffusion_model(self, executor, *args, **kwargs):
        options = kwargs["transformer_options"] if "transformer_options" in kwargs else args[5]
        if self.session is not None:  # told, not inferred: the evaluation's step and which chunks are conditional
            layout = [c == 0 for c in options.get("cond_or_uncond", [0])]
            self.session.begin_evaluation(step=step_of(options), layout=layout)
        return executor(*args, **kwargs)


def step_of(options: Mapping) -> int | None:
    """The sampling step an evaluation belongs to: how many of the call's sigmas lie above its own."""
    sigmas, sigma = options.get("sample_sigmas"), options.get("sigmas")
    if sigmas is None or sigma is None:
        return None
    now = float(sigma.reshape(-1)[0])
    return int((sigmas.float() > now * (1 + 1e-5) + 1e-8).sum())


class LagForward:
    """A ComfyUI layer's forward with LAG's residuals added: f(x) = forward(x) + Σ_k s_k M_k ⊙ (A_k B_k x).

    `block`: the transformer the layer sits in ("" outside any); `proj_out`: it is that transformer's
    output projection (the paper's rule: its own block's regions); `text`: it reads the prompt's
    tokens (cross-attention keys and values); `conv`: the layer, where it is a convolution."""

    def __init__(self, patch: LagPatch, inner, factors: Mapping[str, Factors], *, block: str, proj_out: bool, text: bool,
                 conv: nn.Conv2d | None):
        self.patch, self.inner, self.factors = patch, inner, dict(factors)
        self.block, self.proj_out, self.text, self.conv = block, proj_out, text, conv
        self._on: dict[torch.device, dict[str, Factors]] = {}  # the factors on each device they ran on

    def __deepcopy__(self, memo):
        return self

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.inner(x, *args, **kwargs)
        session = self.patch.session
        if session is None:  # outside sampling: the base layer
            return out
        acting = []
        for name in self.factors:
            mask = session.region(self.block, name, out) if self.proj_out else session.layer_region(self, name, out)
            if mask is None:
                continue
            up, down = self._factors(x.device)[name]
            acting.append((up, down, self.patch.strengths.get(name, 1.0), None if mask is EVERYWHERE else mask))
        return out + residual_sum(x, acting, self.conv) if acting else out

    def _factors(self, device: torch.device) -> dict[str, Factors]:
        if device not in self._on:
            self._on[device] = {n: (up.to(device), down.to(device)) for n, (up, down) in self.factors.items()}
        return self._on[device]


class MapsAttention:
    """ComfyUI's attn2 replacement for one transformer layer: attention of ComfyUI's q, k, v (B, N, heads*d),
    and gives the session its concepts' token maps for the layer's transformer `block`."""

    def __init__(self, patch: LagPatch, block: str, inner=None):
        self.patch, self.block, self.inner = patch, block, inner

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: Mapping) -> torch.Tensor:
        session = self.patch.session
        sets = session.token_sets if session is not None and session.token_sets else None
        heads, b = extra_options["n_heads"], q.shape[0]

        def split(t):  # (B, N, heads*d) -> (B, heads, N, d)
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        if self.inner is not None:  # another node pack's replacement computes the output; the maps beside it
            out = self.inner(q, k, v, extra_options)
            maps = token_maps(split(q), split(k), sets) if sets else None
        else:
            heads_out, maps = attention(split(q), split(k), split(v), token_sets=sets, backend=self.patch.backend)
            out = heads_out.transpose(1, 2).reshape(b, -1, heads_out.shape[1] * heads_out.shape[3]).to(q.dtype)
        if maps is not None:
            session.record(self.block, maps)  # (B, K, N)
        return out
