"""Community-style LoRA files for tests and benchmarks, written the way the tools that make them do.

`random_lora` puts random factors on the layers of a loaded pipeline it is told to (every
Linear and Conv2d by default, text encoders included) and writes them as kohya (sd-scripts'
names in the diffusers layout, or in the original layout: LDM/SGM UNet names, FLUX.1's
Black Forest Labs names with q/k/v and the single blocks' MLP input fused) or as peft /
diffusers keys. It returns each layer's Delta W (alpha / r applied), computed here from the
factors it wrote, so a test checks what persres read against what the file means.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def _shapes(pipe) -> dict[str, tuple[int, ...]]:
    from persres.layers import targets

    return targets(pipe)


def _kohya_name(family, key: str, blocks, layout: str, two_encoders: bool) -> str:
    """sd-scripts' name: a UNet's layers in the diffusers or the original layout, a transformer's under
    lora_transformer_ (OneTrainer's), text encoders under lora_te_ (one) or lora_te1_ / lora_te2_ (two)."""
    from persres.families.sd import ldm_key

    component, _, path = key.partition(".")
    unet = family.denoiser_folder == "unet"
    if component == family.denoiser_folder:
        if layout == "original" and unet:
            levels = {int(b.split(".")[1]) for b in blocks if b.startswith("up_blocks.")}
            depth = max(int(b.split(".")[3]) for b in blocks if b.startswith("down_blocks.")) + 1
            try:
                path = ldm_key(path + ".weight", depth, levels).removesuffix(".weight")
            except KeyError:
                pass
        if layout == "original" and not unet:  # the transformer's original names where its family has them
            return family.kohya_layer_key(path, blocks)
        return ("lora_unet_" if unet else "lora_transformer_") + path.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if two_encoders else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")


FLUX_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
FLUX_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def random_lora(pipe, path: str | Path, fmt: str = "kohya", *, where: Callable[[str], bool] = lambda key: True,
                rank: int = 4, alpha: float = 2.0, scale: float = 0.05, seed: int = 0, layout: str = "diffusers",
                metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Write a LoRA of the layers `where(key)` accepts; returns {layer key: Delta W (m, n[, kh, kw])}."""
    from safetensors.torch import save_file

    from persres import families

    family = families.of(pipe)
    blocks = list(family.blocks(family.denoiser(pipe)))
    shapes = {k: s for k, s in _shapes(pipe).items() if where(k)}
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for key, (m, n, *kernel) in shapes.items():
        down = torch.randn(rank, n, *kernel, generator=gen) * scale
        up = torch.randn(m, rank, generator=gen) * scale
        factors[key] = (up, down)
    out: dict[str, torch.Tensor] = {}
    deltas = {key: (alpha / rank) * (up @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) for key, (up, down) in factors.items()}
    if fmt == "kohya" and layout == "original" and family.denoiser_folder == "transformer":  # sd-scripts' FLUX.1 names
        factors, deltas = _fuse_flux(factors, deltas, alpha, rank)
    for key, (up, down) in factors.items():
        conv = down.ndim == 4
        r = down.shape[0]
        if fmt == "kohya":
            name = key if key.startswith("lora_unet_") else _kohya_name(family, key, blocks, layout,
                                                                        getattr(pipe, "text_encoder_2", None) is not None)
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = (up[:, :, None, None] if conv else up).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha * r / rank)  # the same scale alpha / rank per original component
        else:
            out[f"{key}.lora_A.weight"] = down.contiguous()
            out[f"{key}.lora_B.weight"] = (up[:, :, None, None] if conv else up).contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(out, str(path), metadata=metadata or {})
    return deltas


def _fuse_flux(factors, deltas, alpha, rank):
    """sd-scripts' FLUX.1 layout: q/k/v (and the single blocks' MLP input) as one layer, their
    factors stacked: down (sum r, n), up block-diagonal (sum m, sum r)."""
    fused = dict(factors)
    groups = []
    for key in factors:
        component, _, path = key.partition(".")
        parts = path.split(".")
        if parts[0] == "transformer_blocks" and ".".join(parts[2:]) == "attn.to_q":
            groups.append((f"lora_unet_double_blocks_{parts[1]}_img_attn_qkv", [f"{component}.transformer_blocks.{parts[1]}.{p}" for p in FLUX_FUSED["img_attn_qkv"]]))
        if parts[0] == "transformer_blocks" and ".".join(parts[2:]) == "attn.add_q_proj":
            groups.append((f"lora_unet_double_blocks_{parts[1]}_txt_attn_qkv", [f"{component}.transformer_blocks.{parts[1]}.{p}" for p in FLUX_FUSED["txt_attn_qkv"]]))
        if parts[0] == "single_transformer_blocks" and ".".join(parts[2:]) == "attn.to_q":
            groups.append((f"lora_unet_single_blocks_{parts[1]}_linear1", [f"{component}.single_transformer_blocks.{parts[1]}.{p}" for p in FLUX_SINGLE_FUSED]))
    for name, keys in groups:
        if not all(k in factors for k in keys):
            continue
        ups, downs = [factors[k][0] for k in keys], [factors[k][1] for k in keys]
        fused[name] = (torch.block_diag(*ups), torch.cat(downs))
        for k in keys:
            del fused[k]
    return fused, deltas
