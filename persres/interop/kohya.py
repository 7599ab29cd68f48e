"""The kohya / sd-scripts LoRA layout (AUTOMATIC1111, ComfyUI):

    lora_unet_{block with '_' for '.'}_proj_out.lora_down.weight  (r, m[, 1, 1])  = B
    lora_unet_{...}_proj_out.lora_up.weight                        (m, r[, 1, 1])  = A
    lora_unet_{...}_proj_out.alpha                                 ()              = alpha

Loaders scale by alpha / r; persres writes alpha = r (scale 1, Delta W = A B exactly).
SDXL's UNet names its blocks the original way (input_blocks / middle_block / output_blocks);
that mapping belongs with SDXL support.
"""

from __future__ import annotations

import torch

from persres.packs import PackMeta

PREFIX = "lora_unet_"


def key_of(block: str) -> str:
    return PREFIX + f"{block}.proj_out".replace(".", "_")


def write(tensors, meta: PackMeta, conv: bool) -> dict[str, torch.Tensor]:
    out = {}
    for block in meta.ranks:
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]  # (m, r), (r, m)
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        key = key_of(block)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def is_kohya(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def read(tensors: dict[str, torch.Tensor], blocks: list[str]) -> tuple[dict[str, tuple], list[str]]:
    """({block: (up, down, alpha)} for proj_out targets of `blocks`, [other target names])."""
    by_key = {key_of(b): b for b in blocks}
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
