"""Any LoRA (kohya, diffusers/peft, a persres export) as a pack for a loaded model, every layer kept.

`lora_format` reads the file's header alone and names what it is: a kohya or a peft LoRA, or
what persres cannot apply exactly, refused by name (LoHa, LoKr, DoRA magnitudes, embedding
LoRAs, a file mixing kohya and peft keys, a file of no LoRA at all). Then `read_layers` finds
each target among the model's layers (`targets`: diffusers' names, kohya's in the diffusers and
the original layout, text encoders; fused layers of the original model split by rows), refuses
a target the model does not have by name, and checks that every pair of factors is floating
point, fits its layer at one rank above 0, is finite, and that alpha is one positive number;
alpha / r is folded into A. LoCon's Tucker form (`lora_mid`) is folded into the down
convolution: up . (mid * down) is the same W + A B. Zero rank components (the padding of
persres's diffusers exports) are trimmed, so an export and re-import gives back the original
factors exactly; a rank above the layer's width is legal and is stored exactly as (I, A B).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from persres.errors import PackError


class DroppedTargetsWarning(UserWarning):
    """Told to keep proj_out alone (--proj-out-only), a LoRA's other layers were left out."""


@dataclass(frozen=True)
class ForeignLora:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer key -> (A (m, r), B (r, n[, kh, kw])), scale folded into A
    metadata: dict[str, str]
    fmt: str


# what persres cannot apply as W + A B exactly, by the key names that give each away
UNSUPPORTED = (("hada_w1_a", "a LoHa (Hadamard product) file"), ("lokr_w1", "a LoKr (Kronecker product) file"),
               ("dora_scale", "a DoRA file (magnitude vectors)"), ("lora_magnitude_vector", "a DoRA file (magnitude vectors)"),
               ("lora_embedding_", "a LoRA of embedding tables (lora_embedding_A/B), not of Linear or Conv2d layers"))
def lora_format(path: Path) -> str:
    """"kohya" or "diffusers" from the file's tensor names (the header alone); PackError naming what
    the file is where persres cannot import it."""
    from safetensors import safe_open

    from persres.interop import kohya, peft
    from persres.packs import check_regular_file

    check_regular_file(path, "LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise PackError(f"{str(path)!r} is not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None
    for marker, what in UNSUPPORTED:
        found = next((k for k in keys if marker in k), None)
        if found is not None:
            raise PackError(f"{str(path)!r} is {what} (e.g. {found}), not a plain low-rank LoRA: persres imports "
                            "LoRAs whose change is W + A B exactly")
    is_kohya, is_peft = kohya.is_kohya(keys), peft.is_peft(keys)
    if is_kohya and is_peft:
        raise PackError(f"{str(path)!r} mixes kohya (lora_unet_*) and peft (lora_A/lora_B) keys: save it in one format")
    if not is_kohya and not is_peft:
        raise PackError(f"{str(path)!r} is not a persres pack and holds no LoRA weights persres knows (kohya lora_unet_* or "
                        "peft lora_A/lora_B keys; "
                        f"{len(keys)} tensors, e.g. {keys[0] if keys else 'none'})")
    return "kohya" if is_kohya else "diffusers"


def targets(pipe) -> dict[str, tuple[str, ...]]:
    """Every name a LoRA file may give a layer of this pipeline -> the layer key(s) it changes."""
    from persres import families, layers

    family = families.of(pipe)
    shapes = layers.targets(pipe)
    denoiser = family.denoiser_folder
    blocks = list(family.blocks(family.denoiser(pipe)))
    paths = [k.split(".", 1)[1] for k in shapes if k.startswith(denoiser + ".")]
    out = {name: tuple(f"{denoiser}.{p}" for p in found) for name, found in family.kohya_layer_names(paths, blocks).items()}
    for key in shapes:
        component, path = layers.split(key)
        out[key] = (key,)  # diffusers / peft
        if component == denoiser:
            out.setdefault(path, (key,))  # peft's bare names
            out.setdefault("diffusion_model." + path, (key,))  # ComfyUI-format files of a transformer (ai-toolkit, musubi-tuner)
        variants = {path, path.removeprefix("text_model."), "text_model." + path.removeprefix("text_model.")}
        for prefix in (p for c, p in family.kohya_text_prefixes if c == component):
            for variant in variants:
                out.setdefault(prefix + variant.replace(".", "_"), (key,))
        for variant in variants:
            out.setdefault(f"{component}.{variant}", (key,))
    return out


def read_layers(path: Path, pipe, fmt: str | None = None) -> ForeignLora:
    """Every layer the LoRA file changes, as factors of the layers of `pipe` they fit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from persres import layers
    from persres.interop import kohya, peft

    fmt = fmt or lora_format(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:
        raise PackError(f"{str(path)!r} is not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None
    names = targets(pipe)
    shapes = layers.targets(pipe)
    if fmt == "kohya":
        entries = {t: (p.get("lora_up.weight"), with_mid(path, t, p), p.get("alpha")) for t, p in kohya.read(tensors).items()}
    else:
        entries = peft.read(tensors, metadata)
    unknown = sorted(t for t in entries if t not in names)
    if unknown:
        hit = len(entries) - len(unknown)
        raise PackError(f"{str(path)!r} ({fmt}) changes {len(unknown)} layer(s) this model does not have (e.g. {unknown[0]})"
                        + (f" beside {hit} it has" if hit else "") + ": it was made for another architecture")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, (up, down, alpha) in entries.items():
        keys = names[target]
        where = f"{str(path)!r}, {target}"
        up, down = checked_factors(where, up, down, alpha, sum(shapes[k][0] for k in keys), shapes[keys[0]][1:])
        rows = 0
        for key in keys:  # a fused layer of the original model: its rows are the diffusers layers', in order
            m = shapes[key][0]
            if key in factors:
                raise PackError(f"{where}: {key} is changed twice in one file")
            factors[key] = _trimmed(up[rows : rows + m], down, shapes[key])
            rows += m
    return ForeignLora(factors, metadata, fmt)


def with_mid(path: Path, target: str, parts: dict):
    """kohya's down factor; LoCon's Tucker form folded in: mid (r, r, kh, kw) after down (r, n, 1, 1)."""
    down, mid = parts.get("lora_down.weight"), parts.get("lora_mid.weight")
    if mid is None or down is None:
        return down
    if mid.ndim != 4 or down.ndim != 4 or down.shape[2:] != (1, 1) or mid.shape[1] != down.shape[0]:
        raise PackError(f"{str(path)!r}, {target}: lora_mid {tuple(mid.shape)} does not fit lora_down {tuple(down.shape)}")
    return torch.einsum("abhw,bn->anhw", mid.float(), down.float().flatten(1))  # (r, n, kh, kw)


def checked_factors(where: str, up, down, alpha, m: int, rest: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (m, r), B (r, *rest)) checked, alpha / r folded into A; `rest` is (n,) or (n, kh, kw)."""
    if up is None or down is None:
        raise PackError(f"{where}: one of the two LoRA factors is missing")
    for factor, which in ((up, "up"), (down, "down")):
        if not factor.is_floating_point():
            raise PackError(f"{where}: the {which} factor is {str(factor.dtype).removeprefix('torch.')}, not floating point "
                            "(a quantized LoRA): persres reads float factors only")
    up, down = up.float(), down.float()
    if up.ndim == 4:
        up = up.flatten(1) if up.shape[2:] == (1, 1) else None
    if down is not None and down.ndim == 4 and len(rest) == 1:
        down = down.flatten(1) if down.shape[2:] == (1, 1) else None
    elif down is not None and down.ndim == 2 and len(rest) == 3 and rest[1:] == (1, 1):
        down = down[:, :, None, None]
    if up is None or down is None or up.ndim != 2 or down.ndim != 1 + len(rest):
        raise PackError(f"{where}: factors must be matrices or convolutions of the layer's kernel")
    r = down.shape[0]
    if r == 0 or up.shape[1] == 0:
        raise PackError(f"{where}: rank 0 (factors {tuple(up.shape)} and {tuple(down.shape)}): no change to apply")
    if up.shape != (m, r) or tuple(down.shape[1:]) != tuple(rest):
        raise PackError(f"{where}: factor shapes {tuple(up.shape)} and {tuple(down.shape)} do not fit the layer "
                        f"(expected ({m}, r) and (r, {', '.join(map(str, rest))}))")
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise PackError(f"{where}: factors hold non-finite values")
    scale = 1.0
    if alpha is not None:
        if torch.is_tensor(alpha) and alpha.numel() != 1:
            raise PackError(f"{where}: alpha must be one number, got a tensor of shape {tuple(alpha.shape)}")
        a = float(alpha.float().reshape(-1)[0]) if torch.is_tensor(alpha) else float(alpha)
        if not a > 0 or a != a or a == float("inf"):
            raise PackError(f"{where}: alpha must be a positive finite number, got {a}")
        scale = a / r
    return (up * scale if scale != 1.0 else up), down


def _trimmed(up: torch.Tensor, down: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop all-zero rank components (padding); more components than the layer's width -> (I, A B)."""
    keep = (up.abs().sum(0) > 0) & (down.flatten(1).abs().sum(1) > 0)  # (r,) components that change something
    if not keep.any():
        keep[0] = True
    up, down = up[:, keep], down[keep]
    m = shape[0]
    if up.shape[1] > m:  # more components than the layer's width: the same W + A B at rank m, exactly
        up, down = torch.eye(m), (up @ down.flatten(1)).view(m, *down.shape[1:])
    return up.contiguous(), down.contiguous()


def foreign_pack_tensors(path: Path, pipe, proj_out_only: bool = False, fmt: str | None = None):
    """(pack tensors, ranks, layers, format) of a foreign LoRA file for a loaded pipeline. A LoRA of
    exactly every block's proj_out is a persres pack ("{block}.up"/"{block}.down", `ranks`); any
    other keeps its layers as they are ("{layer}.up"/"{layer}.down", `layers`: key -> [rank, *shape])."""
    from persres import families, layers

    family = families.of(pipe)
    lora = read_layers(path, pipe, fmt)
    blocks = {f"{family.denoiser_folder}.{b}.{family.projection}": b for b in family.blocks(family.denoiser(pipe))}
    if proj_out_only:
        dropped = sorted(k for k in lora.factors if k not in blocks)
        if dropped:
            warnings.warn(f"dropped {len(dropped)} non-proj_out targets of {path.name} (e.g. {dropped[0]})",
                          DroppedTargetsWarning, stacklevel=2)
        factors = {k: v for k, v in lora.factors.items() if k in blocks}
        if not factors:
            raise PackError(f"{str(path)!r} ({lora.fmt}) changes no proj_out layer of this model: nothing is left with --proj-out-only")
    else:
        factors = lora.factors
    shapes = layers.targets(pipe)
    tensors, ranks, others = {}, {}, {}
    as_residuals = set(factors) == set(blocks) and all(len(shapes[k]) == 2 or shapes[k][2:] == (1, 1) for k in factors)
    for key, (up, down) in factors.items():
        if as_residuals:
            block = blocks[key]
            tensors[f"{block}.up"], tensors[f"{block}.down"] = up, down.flatten(1)
            ranks[block] = up.shape[1]
        else:
            tensors[f"{key}.up"], tensors[f"{key}.down"] = up, down.reshape(up.shape[1], *shapes[key][1:])
            others[key] = [up.shape[1], *shapes[key]]
    return tensors, ranks, others, lora.fmt
