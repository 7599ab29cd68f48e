"""Which device and dtype a model runs in: `--device` and `--precision`, auto or asked for."""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

from persres.errors import InputError

if TYPE_CHECKING:
    import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    import torch

    if isinstance(device, torch.device):  # already chosen (a launched process's own GPU)
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class SlowPrecisionWarning(UserWarning):
    """bf16 asked for on a CPU that emulates it (no avx512_bf16 or AMX): it runs, slower than fp32."""


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX-BF16), as torch reports it."""
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:  # once per process: pick_dtype is asked more than once per command
    warnings.warn("--precision bf16 on a CPU without native bf16 (no avx512_bf16 or AMX): it runs, but slower than fp32",
                  SlowPrecisionWarning, stacklevel=3)


# On a CPU that computes bf16 natively, bf16 pays for its casts and its less tuned kernels on a
# small UNet and wins on a large one. The line between, in persres.sizes.unet_width of the UNet's
# config, from `python -m benchmarks.precision_rule` (2-core AMD EPYC with avx512_bf16; docs/
# benchmarks.md, "Precision"): a training step in bf16 takes 1.13x fp32's time on the toy model
# (width 312) and 1.19x on SD v1.4's architecture at 1/8 of its channels (362), but 0.90x at 1/4
# (725), 0.67x at 1/2 (1450) and 0.37x at full size (2900).
BF16_MIN_UNET_WIDTH = 500.0


def choose_dtype(precision: str, device: torch.device, unet_config: dict | None = None) -> tuple[torch.dtype, str]:
    """The frozen model's dtype and why, in words for the `settings:` line (residual factors,
    optimizer state and loss stay fp32 regardless).

    auto: bf16 on a GPU that has it (else fp16); on the CPU bf16 where the CPU computes it
    natively (avx512_bf16 or AMX) and the UNet is large enough for it to be faster (its
    `unet_config`; a model whose config cannot be read without loading counts as large: every
    Stable Diffusion is), else fp32. bf16 matches fp32 on the toy bench within its intervals
    (README: "Precision")."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "the GPU computes bf16"
            return torch.float16, "the GPU lacks bf16"
        if not cpu_native_bf16():
            return torch.float32, "this CPU has no native bf16"
        if unet_config is not None:
            from persres.sizes import unet_width

            try:
                width = unet_width(unet_config)
            except (TypeError, ValueError, KeyError):  # a config of another shape: counted as large
                width = BF16_MIN_UNET_WIDTH
            if width < BF16_MIN_UNET_WIDTH:
                return torch.float32, f"bf16 is slower than fp32 on this CPU for a UNet this small (width {width:.0f} < {BF16_MIN_UNET_WIDTH:.0f})"
        return torch.bfloat16, "native on this CPU, and faster than fp32 for a UNet this large"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise InputError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise InputError("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    if device.type == "cpu" and precision == "bf16" and not cpu_native_bf16():
        _warn_emulated_bf16()
    return dtypes[precision], "asked for"


def pick_dtype(precision: str, device: torch.device, unet_config: dict | None = None) -> torch.dtype:
    """The dtype `choose_dtype` picks."""
    return choose_dtype(precision, device, unet_config)[0]
