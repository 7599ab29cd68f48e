"""The kohya / sd-scripts LoRA layout (AUTOMATIC1111, ComfyUI):

    lora_unet_{block}_proj_out.lora_down.weight  (r, m[, 1, 1])  = B
    lora_unet_{block}_proj_out.lora_up.weight    (m, r[, 1, 1])  = A
    lora_unet_{block}_proj_out.alpha             ()              = alpha

with '_' for '.' in the block's name. Loaders scale by alpha / r; persres writes alpha = r
(scale 1, Delta W = A B exactly). FLUX.1's single-stream block N is sd-scripts'
`lora_unet_single_blocks_N_linear2` (BFL's name for proj_out; down (r, n), up (m, r)). SD 1.x / 2.x files name blocks the diffusers way
(`down_blocks_1_attentions_0`); SDXL files name them the original (SGM) way, as sd-scripts
writes and ComfyUI's key map reads them: down_blocks.i.attentions.j is input_blocks.(1 +
i(L+1) + j).1, mid_block.attentions.0 is middle_block.1, up_blocks.i.attentions.j is
output_blocks.(i(L+1) + j).1, for L resnets per down level. Reading accepts both namings.
"""

from __future__ import annotations

import torch

from persres.families import family_of_meta
from persres.packs import PackMeta

PREFIX = "lora_unet_"


def levels_depth(blocks) -> int:
    """L, the resnets per down level, from the blocks' names (up levels hold L + 1)."""
    down = [int(b.split(".")[3]) for b in blocks if b.startswith("down_blocks.")]
    if down:
        return max(down) + 1
    up = [int(b.split(".")[3]) for b in blocks if b.startswith("up_blocks.")]
    return max(up) if up else 1


def sgm_name(block: str, depth: int) -> str:
    """A diffusers transformer block's name in the original UNet, e.g. 'input_blocks.4.1'."""
    parts = block.split(".")
    if parts[0] == "mid_block":
        return "middle_block.1"
    level, j = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return f"input_blocks.{1 + level * (depth + 1) + j}.1"
    return f"output_blocks.{level * (depth + 1) + j}.1"


FLUX_SINGLE = "single_transformer_blocks."


def key_of(block: str, depth: int | None = None) -> str:
    """The file key of a block's proj_out: BFL-named on FLUX.1, SGM-named when `depth` is given (SDXL),
    else diffusers-named."""
    if block.startswith(FLUX_SINGLE):
        return f"{PREFIX}single_blocks_{block.removeprefix(FLUX_SINGLE)}_linear2"
    name = block if depth is None else sgm_name(block, depth)
    return PREFIX + f"{name}.proj_out".replace(".", "_")


def write(tensors, meta: PackMeta, conv: bool) -> dict[str, torch.Tensor]:
    depth = levels_depth(meta.ranks) if family_of_meta(meta) == "sdxl" else None
    out = {}
    for block in meta.ranks:
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]  # (m, r), (r, n)
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        key = key_of(block, depth)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def is_kohya(keys) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def read(tensors: dict[str, torch.Tensor], blocks: list[str]) -> tuple[dict[str, tuple], list[str]]:
    """({block: (up, down, alpha)} for proj_out targets of `blocks`, [other target names])."""
    depth = levels_depth(blocks)
    by_key = {key_of(b): b for b in blocks} | {key_of(b, depth): b for b in blocks}
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
