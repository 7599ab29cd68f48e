"""Image sizes a model and a machine can do, decided before any work starts.

A side up to `WARN_RATIO` times the model's native size is fine; past it a one-line warning
(a UNet draws repeated or broken pictures far from the size it was trained at); past
`LIMIT_RATIO` it is refused unless `force`. The memory a run needs is estimated from the
UNet's widths and the latent size, and a run that would need more than the device has
available is refused with both numbers (also unless `force`).

The estimate: activations grow with the latent pixels times the UNet's width, summed over
its levels as Σ C_l·(2·L_l + 1)/4^l (C_l channels and L_l layers of down block l; its up
block has L_l + 1), at `TRAIN_BYTES` (training: every activation kept for the backward pass)
or `GEN_BYTES` (sampling, per image and CFG half) bytes per latent pixel and width unit in
fp32, half that in fp16/bf16; fitted to peak RSS of the toy model's UNet at 64-256 px
(`python -m benchmarks.size_memory`), so it is an estimate, said as "~".
"""

from __future__ import annotations

import os

from persres import families
from persres.errors import SizeError
from persres.families.sd import GEN_BYTES, TRAIN_BYTES, unet_width  # noqa: F401  (the UNet estimate, named here)

WARN_RATIO = 2.0
LIMIT_RATIO = 4.0


class SizeWarning(UserWarning):
    """A size far from the model's native one."""


def native_side(pipe) -> int:
    """The side the model was trained at, in pixels (its family's rule)."""
    return families.of(pipe).native_side(pipe)


def needed_bytes(pipe, height: int, width: int, samples: int, training: bool) -> int:
    """~ the activation bytes of one denoiser pass (with its backward when `training`) over `samples`
    latents, by its family's estimate (0 where none is fitted: no memory refusal there)."""
    return families.of(pipe).needed_bytes(pipe, height, width, samples, training)


def available_bytes(device) -> int | None:
    """Memory free for new allocations on `device` now (None where it cannot be told)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**28 else f"{n / 2**20:.0f} MB"


def check_size(pipe, height: int, width: int, samples: int, *, training: bool, force: bool = False,
               what: str = "the image") -> None:
    """SizeError, a SizeWarning, or nothing (see the module doc). `samples`: latents per UNet pass."""
    import warnings

    native = native_side(pipe)
    ratio = max(height, width) / native
    size = f"{width}x{height}" if height != width else f"{height}"
    if ratio > LIMIT_RATIO and not force:
        raise SizeError(f"{what} size {size} px is {ratio:g}x the model's native {native} px; persres refuses past "
                        f"{LIMIT_RATIO:g}x ({int(native * LIMIT_RATIO)} px): pass --force-size to try anyway")
    need, have = needed_bytes(pipe, height, width, samples, training), available_bytes(pipe.device)
    if have is not None and need > have and not force:
        raise SizeError(f"{what} size {size} px needs ~{gib(need)} of memory, this machine has {gib(have)} available: "
                        f"use a smaller size{' or --batch-size' if training else ''}, or pass --force-size to try anyway")
    if ratio > WARN_RATIO:
        warnings.warn(f"{what} size {size} px is {ratio:g}x the model's native {native} px: expect repeated or broken "
                      f"pictures (~{gib(need)} of memory)", SizeWarning, stacklevel=3)
