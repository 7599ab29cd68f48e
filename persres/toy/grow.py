"""Grow a diffusers UNet to more layers per block without changing what it computes.

Stable Diffusion v1.x has two layers per down block (16 transformer blocks, so 16 proj_outs
for the residuals); the toy model was built with one (7). `grow_unet` adds layers the way
ControlNet adds its branch: every new layer starts as an identity, so the grown model draws
exactly what the old one drew, and a fine-tune (`persres.toy.build --grow-layers`) then
teaches the new layers something.

Down block of a level with L old layers and k new ones: layers 0..L-1 are the old ones,
layers L..L+k-1 are new identities (ResnetBlock2D with conv2 = 0, Transformer2DModel with
proj_out = 0, both add to their input). The level's skip connections become
[r_0 .. r_{L-1}, id_1 .. id_k, downsample], where every id equals r_{L-1}.

Its up block (L+1 old resnets u_0..u_L, L+k+1 new v_0..v_{L+k}) pops those skips from the
end: v_0 gets id_k (= r_{L-1}, what u_0 got), so v_0 <- u_0; v_1..v_k get id_{k-1}..r_{L-1}
and are identities that ignore their skip (conv2 = 0, conv_shortcut = [I | 0] on
cat(hidden, skip)); v_{j+k} gets what u_j got for j >= 1, so v_{j+k} <- u_j.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _old_to_new_up(n_old: int, extra: int) -> dict[int, int]:
    return {0: 0, **{j: j + extra for j in range(1, n_old)}}


def _identity_init(name: str, value: torch.Tensor) -> torch.Tensor:
    """The value a new layer's tensor `name` starts from so that the layer is an identity."""
    if ".conv2." in name or ".proj_out." in name:
        return torch.zeros_like(value)
    if ".conv_shortcut." in name:
        out = torch.zeros_like(value)
        if name.endswith("weight"):  # (C_out, C_in, 1, 1): pass the first C_out channels (the hidden state)
            out[:, : value.shape[0], 0, 0] = torch.eye(value.shape[0])
        return out
    return value


def grow_unet(unet, layers_per_block: Sequence[int]):
    """A new UNet2DConditionModel with `layers_per_block` (one per down block, each >= the
    old count) that computes exactly what `unet` computes."""
    from diffusers import UNet2DConditionModel

    old_layers = unet.config.layers_per_block
    n_levels = len(unet.down_blocks)
    old_layers = [old_layers] * n_levels if isinstance(old_layers, int) else list(old_layers)
    new_layers = list(layers_per_block)
    if len(new_layers) != n_levels or any(n < o for n, o in zip(new_layers, old_layers)):
        raise ValueError(f"layers_per_block {new_layers}: need {n_levels} counts, each >= {old_layers}")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    grown = UNet2DConditionModel(**{**config, "layers_per_block": new_layers})
    if grown.dtype != unet.dtype:
        grown = grown.to(unet.dtype)

    renames: dict[str, str] = {}  # old name prefix -> new name prefix
    for level, (old, new) in enumerate(zip(old_layers, new_layers)):
        up = n_levels - 1 - level
        for j_old, j_new in _old_to_new_up(old + 1, new - old).items():
            for kind in ("resnets", "attentions"):
                renames[f"up_blocks.{up}.{kind}.{j_old}."] = f"up_blocks.{up}.{kind}.{j_new}."

    def new_name(name: str) -> str:
        for old_prefix, new_prefix in renames.items():
            if name.startswith(old_prefix):
                return new_prefix + name[len(old_prefix):]
        return name

    state = {new_name(k): v for k, v in unet.state_dict().items()}
    fresh = grown.state_dict()
    unknown = sorted(set(state) - set(fresh))
    if unknown:
        raise RuntimeError(f"grow_unet: no place for {unknown[:3]}")
    for name, value in fresh.items():
        if name not in state:
            state[name] = _identity_init(name, value)
    grown.load_state_dict(state)
    return grown
