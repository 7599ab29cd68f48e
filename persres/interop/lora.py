"""Any proj_out LoRA (kohya, diffusers/peft, a persres export) as a pack for a loaded model.

`lora_format` reads the file's header alone and names what it is: a kohya or a peft LoRA, or
what persres cannot apply exactly, refused by name (LoHa, LoKr, DoRA magnitudes, LoCon's
Tucker `lora_mid`, a file mixing kohya and peft keys, a file of no LoRA at all). Then
`read_foreign` checks that the file targets the proj_out of this model's transformer blocks
(and nothing else, unless told to drop the rest), that every pair of factors is floating point,
has the block's channels and one rank above 0, that the values are finite and alpha is one
positive number; folds alpha / r into A. Zero rank components (the padding of persres's
diffusers exports) are trimmed, so an export and re-import gives back the original factors
exactly; a rank still above the layer's width is legal and is stored exactly as (I, A B).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from persres.errors import PackError


class DroppedTargetsWarning(UserWarning):
    """A foreign LoRA also trained layers other than proj_out; those were left out."""


@dataclass(frozen=True)
class ForeignLora:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # block -> (A (m, r), B (r, n)), scale folded into A
    metadata: dict[str, str]
    fmt: str


# what persres cannot apply as W + A B exactly, by the key names that give each away
UNSUPPORTED = (("hada_w1_a", "a LoHa (Hadamard product) file"), ("lokr_w1", "a LoKr (Kronecker product) file"),
               ("dora_scale", "a DoRA file (magnitude vectors)"), ("lora_magnitude_vector", "a DoRA file (magnitude vectors)"),
               ("lora_mid", "a LoCon file with Tucker-decomposed convolutions (lora_mid)"))


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


def read_foreign(path: Path, family, channels: dict[str, int], proj_out_only: bool = False,
                 in_channels: dict[str, int] | None = None, fmt: str | None = None) -> ForeignLora:
    """The file's proj_out factors for a model of `family` whose blocks have `channels` (m) and,
    where they differ, `in_channels` (n). `fmt`: what `lora_format` already said of the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from persres.interop import kohya, peft

    fmt = fmt or lora_format(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:
        raise PackError(f"{str(path)!r} is not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None
    blocks = sorted(channels)
    found, others = kohya.read(tensors, blocks, family) if fmt == "kohya" else peft.read(tensors, blocks, metadata)
    if not found:
        raise PackError(f"{str(path)!r} ({fmt}) targets no proj_out layer of this model ({len(others)} other targets, "
                        f"e.g. {others[0] if others else 'none'}): it was made for another architecture or other layers")
    missing = [b for b in blocks if b not in found]
    if missing:
        raise PackError(f"{str(path)!r} ({fmt}) has no factors for {len(missing)} of this model's {len(blocks)} "
                        f"proj_out layers (e.g. {missing[0]}): it was made for another architecture")
    if others and not proj_out_only:
        raise PackError(f"{str(path)!r} ({fmt}) also targets {len(others)} layers that are not proj_out "
                        f"(e.g. {others[0]}); persres would have to drop them: pass --proj-out-only to do so")
    if others:
        warnings.warn(f"dropped {len(others)} non-proj_out targets of {path.name} (e.g. {others[0]})", DroppedTargetsWarning, stacklevel=2)
    ins = in_channels or {}
    factors = {block: _factors(path, block, *found[block], channels[block], ins.get(block, channels[block])) for block in blocks}
    return ForeignLora(factors, metadata, fmt)


def _factors(path: Path, block: str, up, down, alpha, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"{str(path)!r}, {block}"
    if up is None or down is None:
        raise PackError(f"{where}: one of the two LoRA factors is missing")
    for factor, which in ((up, "up"), (down, "down")):
        if not factor.is_floating_point():
            raise PackError(f"{where}: the {which} factor is {str(factor.dtype).removeprefix('torch.')}, not floating point "
                            "(a quantized LoRA): persres reads float factors only")
    up, down = up.float(), down.float()
    if up.ndim == 4:
        up = up.flatten(1) if up.shape[2:] == (1, 1) else None
    if down.ndim == 4:
        down = down.flatten(1) if down.shape[2:] == (1, 1) else None
    if up is None or down is None or up.ndim != 2 or down.ndim != 2:
        raise PackError(f"{where}: factors must be matrices or 1x1 convolutions")
    r = down.shape[0]
    if r == 0 or up.shape[1] == 0:
        raise PackError(f"{where}: rank 0 (factors {tuple(up.shape)} and {tuple(down.shape)}): no change to apply")
    if up.shape != (m, r) or down.shape != (r, n):
        size = f"{m} channels" if n == m else f"{n} -> {m} features"
        raise PackError(f"{where}: factor shapes {tuple(up.shape)} and {tuple(down.shape)} do not fit {size} "
                        f"at one rank (expected ({m}, r) and (r, {n}))")
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
    keep = (up.abs().sum(0) > 0) | (down.abs().sum(1) > 0)  # (r,) components that are not all zero
    if not keep.any():
        keep[0] = True
    up, down = up[:, keep], down[keep]
    up = up * scale if scale != 1.0 else up
    if up.shape[1] > m:  # more components than the layer's width: the same W + A B at rank m, exactly
        up, down = torch.eye(m), up @ down  # (m, m), (m, n)
    return up.contiguous(), down.contiguous()


def foreign_pack_tensors(path: Path, pipe, proj_out_only: bool = False,
                         fmt: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """(pack tensors "{block}.up"/"{block}.down", ranks, format) of a foreign LoRA file for a loaded pipeline."""
    from persres import families
    from persres.residuals import block_channels, block_in_channels

    family = families.of(pipe)
    model = family.denoiser(pipe)
    lora = read_foreign(path, family, block_channels(model), proj_out_only, block_in_channels(model), fmt)
    tensors, ranks = {}, {}
    for block, (up, down) in lora.factors.items():
        tensors[f"{block}.up"], tensors[f"{block}.down"] = up, down
        ranks[block] = up.shape[1]
    return tensors, ranks, lora.fmt
