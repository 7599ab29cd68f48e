"""LoRA files other tools read and write, to and from persres packs.

One module per format, each a `write` (pack -> file tensors) and a `read` (file tensors ->
per-block factors (A, B) with alpha/r folded in), so every route lands on the same thing:
- `kohya`: AUTOMATIC1111's built-in Lora, ComfyUI's LoraLoader, sd-scripts.
- `peft`: diffusers' `load_lora_weights` (peft-style keys, "unet." prefixed or not).
- `metadata`: the kohya `ss_*` and SAI `modelspec.*` keys UIs and model hubs show.
`persres.interop.lora` detects a file's format and turns it into a pack for a model.
"""

from __future__ import annotations

from pathlib import Path

from persres.atomic import atomic_path
from persres.errors import InputError
from persres.packs import PackMeta

FORMATS = ("persres", "diffusers", "kohya")


def write_lora(path: Path, fmt: str, tensors, meta: PackMeta) -> Path:
    """Write a pack as a `diffusers` or `kohya` LoRA file (atomically), with UI metadata."""
    from safetensors.torch import save_file

    from persres.interop import kohya, metadata, peft

    if fmt not in ("diffusers", "kohya"):
        raise InputError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    conv = meta.proj_out == "Conv2d"
    converted = peft.write(tensors, meta, conv) if fmt == "diffusers" else kohya.write(tensors, meta, conv)
    info = metadata.for_export(meta, fmt)
    with atomic_path(path) as tmp:
        save_file(converted, str(tmp), metadata=info)
    return path
