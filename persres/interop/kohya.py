"""The kohya / sd-scripts LoRA layout (AUTOMATIC1111, ComfyUI):

    lora_unet_{block}_proj_out.lora_down.weight  (r, m[, 1, 1])  = B
    lora_unet_{block}_proj_out.lora_up.weight    (m, r[, 1, 1])  = A
    lora_unet_{block}_proj_out.alpha             ()              = alpha

and for any other layer of a LoRA, the family's name for it (`Family.kohya_layer_key`) or
`lora_te_` / `lora_te1_` / `lora_te2_` + its text-encoder path; a convolution's down factor
keeps its kernel (r, n, kh, kw), its up factor is 1x1 (LoCon's layout).

with '_' for '.' in the block's name, or the name sd-scripts gives the block in the model's
original layout: each family names its blocks (`Family.kohya_key`; reading accepts every
name in `Family.kohya_keys`). Loaders scale by alpha / r; persres writes alpha = r (scale 1,
Delta W = A B exactly); down is (r, n), up (m, r).
"""

from __future__ import annotations

import torch

from persres import families
from persres.packs import PackMeta

PREFIX = "lora_unet_"


def write(tensors, meta: PackMeta, conv: bool) -> dict[str, torch.Tensor]:
    family = families.of_meta(meta)
    out = {}
    for block in meta.ranks:
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]  # (m, r), (r, n)
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        key = family.kohya_key(block, meta.ranks)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    for layer, (r, *shape) in meta.layers.items():
        up, down = tensors[f"{layer}.up"], tensors[f"{layer}.down"]  # (m, r), (r, n[, kh, kw])
        key = layer_key(family, layer, list(meta.channels))
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = (up[:, :, None, None] if len(shape) == 4 else up).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(r))
    return out


def layer_key(family: families.Family, layer: str, blocks: list[str]) -> str:
    """The kohya name of any other layer: the family's for the denoiser's, lora_te*_ for a text encoder's."""
    component, _, path = layer.partition(".")
    if component == family.denoiser_folder:
        return family.kohya_layer_key(path, blocks)
    prefix = next(p for c, p in family.kohya_text_prefixes if c == component)
    return prefix + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")


PREFIXES = (PREFIX, "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")  # denoiser, text encoders, FLUX (OneTrainer)


def is_kohya(keys) -> bool:
    return any(k.startswith(PREFIXES) for k in keys)


def read(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{target name: {part: tensor}} ("lora_up.weight", "lora_down.weight", "alpha", "lora_mid.weight")."""
    found: dict[str, dict] = {}
    for k, v in tensors.items():
        target, _, part = k.partition(".")
        found.setdefault(target, {})[part] = v
    return found
