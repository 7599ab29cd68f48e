"""The diffusers / peft LoRA layout (`pipe.load_lora_weights(file)`):

    unet.{block}.proj_out.lora_A.weight  (R, n[, 1, 1])  = B, zero-padded to rank R
    unet.{block}.proj_out.lora_B.weight  (m, R[, 1, 1])  = A, zero-padded to rank R

(prefixed by the denoiser's name: "unet." or "transformer.", `Family.denoiser_folder`.)
persres pads every block to the pack's largest rank R (zero rows and columns: the product
A B is unchanged) and writes `lora_adapter_metadata` with r = lora_alpha = R. One rank for
every module means scale alpha / r = 1 on every diffusers version, whether it reads the
metadata (0.35 on) or infers ranks and alphas from the tensors (older releases took the
first module's rank as every module's alpha, which scaled mixed-rank files wrongly).
Reading accepts "unet."-prefixed diffusers keys, peft's "base_model.model." keys and bare
keys, with alphas from `lora_adapter_metadata` (rank/alpha patterns) or `.alpha` tensors;
without either, alpha = rank (diffusers' convention, scale 1).
"""

from __future__ import annotations

import json

import torch

from persres.errors import PackError
from persres import families
from persres.packs import PackMeta

PREFIXES = ("unet.", "transformer.", "base_model.model.", "")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def prefix_of(meta: PackMeta) -> str:
    """The denoiser's name in diffusers' LoRA files ("unet" or "transformer")."""
    return families.of_meta(meta).denoiser_folder


def write(tensors, meta: PackMeta, conv: bool) -> dict[str, torch.Tensor]:
    rank, prefix = max(meta.ranks.values()), prefix_of(meta)
    out = {}
    for block, r in meta.ranks.items():
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]  # (m, r), (r, n)
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)  # (m, R)
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])], dim=0)  # (R, n)
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        out[f"{prefix}.{block}.proj_out.lora_A.weight"] = down.contiguous()
        out[f"{prefix}.{block}.proj_out.lora_B.weight"] = up.contiguous()
    return out


def adapter_metadata(meta: PackMeta) -> str:
    """The JSON diffusers writes under `lora_adapter_metadata` (LoraConfig fields, prefixed by the denoiser's name)."""
    rank = max(meta.ranks.values())
    config = {"r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": sorted(f"{b}.proj_out" for b in meta.ranks), "lora_dropout": 0.0,
              "init_lora_weights": True, "use_dora": False, "lora_bias": False}
    return json.dumps({f"{prefix_of(meta)}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)


def is_peft(keys) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


def _alpha_for(module: str, rank: int, config: dict | None, alphas: dict[str, torch.Tensor]) -> float:
    if module in alphas:
        return _number(alphas[module], module, ".alpha tensor")
    if config:
        patterns = config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise PackError(f"the LoRA's adapter metadata has an alpha_pattern that is not an object: {patterns!r}")
        for pattern, value in patterns.items():
            if module == pattern or module.endswith("." + pattern) or pattern.endswith(module):
                return _number(value, module, "alpha_pattern")
        if "lora_alpha" in config:
            return _number(config["lora_alpha"], module, "lora_alpha")
    return float(rank)


def _number(value, module: str, where: str) -> float:
    if torch.is_tensor(value) and value.numel() != 1:
        raise PackError(f"the LoRA's {where} for {module} must be one number, got a tensor of shape {tuple(value.shape)}")
    try:
        return float(value.float().reshape(-1)[0]) if torch.is_tensor(value) else float(value)
    except (TypeError, ValueError, IndexError, RuntimeError):
        raise PackError(f"the LoRA's {where} for {module} is not a number: {value!r}"[:300]) from None


def read(tensors: dict[str, torch.Tensor], blocks: list[str], metadata: dict[str, str]) -> tuple[dict[str, tuple], list[str]]:
    """({block: (up, down, alpha)} for proj_out targets of `blocks`, [other target names])."""
    config = None
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            loaded = json.loads(raw)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, dict):
            config = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in loaded.items()}
    modules: dict[str, dict] = {}
    alphas: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        name = next(k[len(p):] for p in PREFIXES if k.startswith(p))
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = v
            continue
        module, sep, part = name.partition(".lora_")
        if not sep:
            modules.setdefault(name, {})
            continue
        modules.setdefault(module, {})[part] = v
    wanted = {f"{b}.proj_out": b for b in blocks}
    out, others = {}, []
    for module, parts in modules.items():
        if module not in wanted:
            others.append(module)
            continue
        up, down = parts.get("B.weight"), parts.get("A.weight")
        rank = down.shape[0] if down is not None and down.ndim >= 1 else 0
        out[wanted[module]] = (up, down, torch.tensor(_alpha_for(module, rank, config, alphas)))
    return out, sorted(others)
