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

import os
from typing import TYPE_CHECKING

from persres.atomic import atomic_path
from persres.errors import InputError
from persres.packs import PackMeta

if TYPE_CHECKING:
    from persres.registry import Registry

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


def export_concept(registry: Registry, name: str, output: str | Path, fmt: str = "persres", force: bool = False) -> Path:
    """`persres export`: the pack itself, or a LoRA file diffusers, A1111 or ComfyUI load (no model needed)."""
    from persres.registry.paths import check_export_target

    if isinstance(output, str) and output.endswith(("/", os.sep)):  # Path() would drop what says it is a folder
        raise InputError(f"{output!r} names a folder: give a file name, e.g. {output + name + '.safetensors'!r}")
    output = Path(output)
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "persres":
        return registry.export_pack(name, output, force=force)
    tensors, meta = registry.load(name)
    check_export_target(output, registry, force)
    return write_lora(output, fmt, tensors, meta)
