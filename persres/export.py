"""Export a pack to the LoRA layouts other tools load.

- `persres`: the pack itself (re-importable with `persres import`).
- `diffusers`: peft-style keys, `pipe.load_lora_weights(file)` (needs peft):
  "unet.{block}.proj_out.lora_A.weight" = B_i (r, m[, 1, 1]), "...lora_B.weight" = A_i.
- `kohya`: the layout AUTOMATIC1111's built-in Lora and ComfyUI's LoraLoader read:
  "lora_unet_{block with _}_proj_out.lora_down.weight" = B_i, ".lora_up.weight" = A_i,
  ".alpha" = r (so that alpha / r = 1: Delta W = A_i B_i exactly).
The identifier token is part of the base model's vocabulary, so in every tool the prompt
just uses it ("a photo of sks dog"); no embedding file is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from persres.errors import InputError
from persres.packs import PackMeta

FORMATS = ("persres", "diffusers", "kohya")


def _factors(tensors: dict[str, torch.Tensor], meta: PackMeta, conv: bool):
    for block in meta.ranks:
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]  # (m, r), (r, m)
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        yield block, up.contiguous(), down.contiguous()


def to_diffusers(tensors, meta: PackMeta, conv: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for block, up, down in _factors(tensors, meta, conv):
        out[f"unet.{block}.proj_out.lora_A.weight"] = down
        out[f"unet.{block}.proj_out.lora_B.weight"] = up
    return out


def to_kohya(tensors, meta: PackMeta, conv: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for block, up, down in _factors(tensors, meta, conv):
        key = "lora_unet_" + f"{block}.proj_out".replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def write_foreign(path: Path, fmt: str, tensors, meta: PackMeta, conv: bool = True) -> Path:
    from safetensors.torch import save_file

    if fmt not in ("diffusers", "kohya"):
        raise InputError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    converted = to_diffusers(tensors, meta, conv) if fmt == "diffusers" else to_kohya(tensors, meta, conv)
    metadata = {"persres.identifier": meta.identifier, "persres.class_word": meta.class_word, "ss_base_model_version": "sd_v1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(converted, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
