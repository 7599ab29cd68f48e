"""The kohya / sd-scripts LoRA layout (AUTOMATIC1111, ComfyUI):

    lora_unet_{block}_proj_out.lora_down.weight  (r, m[, 1, 1])  = B
    lora_unet_{block}_proj_out.lora_up.weight    (m, r[, 1, 1])  = A
    lora_unet_{block}_proj_out.alpha             ()              = alpha

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
    return out


def is_kohya(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def read(tensors: dict[str, torch.Tensor], blocks: list[str], family: families.Family) -> tuple[dict[str, tuple], list[str]]:
    """({block: (up, down, alpha)} for proj_out targets of `blocks`, [other target names])."""
    by_key = {key: b for b in blocks for key in family.kohya_keys(b, blocks)}
    found: dict[str, dict] = {}
    others = set()
    for k, v in tensors.items():
        target, _, part = k.partition(".")
        if target in by_key:
            found.setdefault(by_key[target], {})[part] = v
        else:
            others.add(target)
    out = {}
    for block, parts in found.items():
        out[block] = (parts.get("lora_up.weight"), parts.get("lora_down.weight"), parts.get("alpha"))
    return out, sorted(others)
