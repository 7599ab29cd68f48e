"""The diffusers / peft LoRA layout (`pipe.load_lora_weights(file)`):

    unet.{block}.proj_out.lora_A.weight  (R, n[, 1, 1])  = B, zero-padded to rank R
    unet.{block}.proj_out.lora_B.weight  (m, R[, 1, 1])  = A, zero-padded to rank R
    (a diffusion transformer's blocks: the family's `projection` in place of proj_out)
    {component}.{path}.lora_A.weight     (R, n[, kh, kw]) and .lora_B.weight (m, R[, 1, 1]): any other layer

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


def max_rank(meta: PackMeta) -> int:
    return max([*meta.ranks.values(), *(spec[0] for spec in meta.layers.values())])


def write(tensors, meta: PackMeta, conv: bool) -> dict[str, torch.Tensor]:
    rank, prefix = max_rank(meta), prefix_of(meta)
    projection = families.of_meta(meta).projection
    out = {}
    for block, r in meta.ranks.items():
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]  # (m, r), (r, n)
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)  # (m, R)
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])], dim=0)  # (R, n)
        if conv:
            up, down = up[:, :, None, None], down[:, :, None, None]
        out[f"{prefix}.{block}.{projection}.lora_A.weight"] = down.contiguous()
        out[f"{prefix}.{block}.{projection}.lora_B.weight"] = up.contiguous()
    for layer, (r, *shape) in meta.layers.items():  # "{component}.{path}", as diffusers names it
        up, down = tensors[f"{layer}.up"], tensors[f"{layer}.down"]  # (m, r), (r, n[, kh, kw])
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)  # (m, R)
        down = torch.cat([down, down.new_zeros(rank - r, *down.shape[1:])], dim=0)  # (R, n[, kh, kw])
        out[f"{layer}.lora_A.weight"] = down.contiguous()
        out[f"{layer}.lora_B.weight"] = (up[:, :, None, None] if len(shape) == 4 else up).contiguous()
    return out


def adapter_metadata(meta: PackMeta) -> str:
    """The JSON diffusers writes under `lora_adapter_metadata` (LoraConfig fields, prefixed by the denoiser's name)."""
    rank, prefix = max_rank(meta), prefix_of(meta) + "."
    projection = families.of_meta(meta).projection
    modules = [f"{b}.{projection}" for b in meta.ranks] + [k.removeprefix(prefix) for k in meta.layers if k.startswith(prefix)]
    config = {"r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": sorted(modules), "lora_dropout": 0.0,
              "init_lora_weights": True, "use_dora": False, "lora_bias": False}
    return json.dumps({f"{prefix_of(meta)}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)


def is_peft(keys) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


def _alpha_for(module: str, rank: int, config: dict | None, alpha=None, bare_alpha=None) -> float:
    for given in (alpha, bare_alpha):
        if given is not None:
            return _number(given, module, ".alpha tensor")
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


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, tuple]:
    """{module name as the file gives it, less "base_model.model.": (up, down, alpha)}."""
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
        name = k.removeprefix("base_model.model.")
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = v
            continue
        module, sep, part = name.partition(".lora_")
        modules.setdefault(module if sep else name, {})
        if sep:
            modules[module][part] = v
    out = {}
    for module, parts in modules.items():
        up, down = parts.get("B.weight"), parts.get("A.weight")
        rank = down.shape[0] if down is not None and down.ndim >= 1 else 0
        bare = module.split(".", 1)[1] if module.split(".", 1)[0] in ("unet", "transformer") else module
        out[module] = (up, down, torch.tensor(_alpha_for(bare, rank, config, alphas.get(module) if module in alphas else None,
                                                          alphas.get(bare))))
    return out
