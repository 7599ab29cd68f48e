"""The rules every `packs.PackMeta` field obeys, checked before anything trusts a pack's metadata."""

from __future__ import annotations

import math
import re

from persres.families import FAMILIES
from persres.names import IDENTIFIER_RE, MAX_CLASS_WORD, NAME_RE, clean_class_word, layer_parameter_count, parameter_count

BLOCK_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")  # module paths ("all_final_layer.2-1" on Z-Image)


def _bad(field: str, why: str) -> ValueError:
    return ValueError(f"field {field!r} {why}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def validate_meta(meta):
    """Types and ranges of every field; raises ValueError naming the first bad one."""
    if not isinstance(meta.name, str) or not NAME_RE.fullmatch(meta.name):
        raise _bad("name", f"must be letters, digits, '_' or '-' (at most 64), got {meta.name!r}")
    if not isinstance(meta.identifier, str) or not IDENTIFIER_RE.fullmatch(meta.identifier):
        raise _bad("identifier", f"must be 1-32 lowercase letters, got {meta.identifier!r}")
    if clean_class_word(meta.class_word) is None:
        raise _bad("class_word", f"must be 1-{MAX_CLASS_WORD} printable characters, got {meta.class_word!r}")
    if not isinstance(meta.layers, dict):
        raise _bad("layers", "must be an object of layer -> [rank, out, in(, kh, kw)]")
    for layer, spec in meta.layers.items():
        if (not isinstance(layer, str) or not BLOCK_RE.fullmatch(layer) or "." not in layer or not isinstance(spec, list)
                or len(spec) not in (3, 5) or not all(_is_int(n) and 1 <= n <= 1 << 16 for n in spec)):
            raise _bad("layers", f"has a bad entry {layer!r}: {spec!r}")
    if not isinstance(meta.everywhere, bool):
        raise _bad("everywhere", f"must be true or false, got {meta.everywhere!r}")
    for field in ("ranks", "channels", "in_channels"):
        value = getattr(meta, field)
        if not isinstance(value, dict) or (not value and field == "ranks" and not meta.layers):
            raise _bad(field, "must be a non-empty object of block -> integer")
        if not isinstance(value, dict):
            raise _bad(field, "must be an object of block -> integer")
        for block, n in value.items():
            if not BLOCK_RE.fullmatch(block) or not _is_int(n) or not 1 <= n <= 1 << 16:
                raise _bad(field, f"has a bad entry {block!r}: {n!r}")
    if meta.ranks and set(meta.ranks) != set(meta.channels):
        raise _bad("ranks", "and channels name different blocks")
    if not set(meta.in_channels) <= set(meta.channels):
        raise _bad("in_channels", "names a block the ranks do not")
    for block, r in meta.ranks.items():
        if r > meta.channels[block]:
            raise _bad("ranks", f"has rank {r} above the {meta.channels[block]} channels of {block!r}")
    expected = parameter_count(meta.ranks, meta.channels, meta.in_channels) + layer_parameter_count(meta.layers)
    if not _is_int(meta.parameter_count) or meta.parameter_count != expected:
        raise _bad("parameter_count", f"is {meta.parameter_count!r}; the ranks and channels give {expected}")
    for field in ("base_model", "architecture", "weights", "created_at"):
        if not isinstance(getattr(meta, field), str):
            raise _bad(field, "must be a string")
    if meta.proj_out not in ("Conv2d", "Linear"):
        raise _bad("proj_out", f"must be Conv2d or Linear, got {meta.proj_out!r}")
    if meta.family != "" and meta.family not in FAMILIES:
        raise _bad("family", f"must be one of {', '.join(FAMILIES)}, got {meta.family!r}")
    if not isinstance(meta.train_config, dict):
        raise _bad("train_config", "must be an object")
    if not isinstance(meta.image_hashes, list) or not all(isinstance(h, str) for h in meta.image_hashes):
        raise _bad("image_hashes", "must be a list of strings")
    for field in ("loss_start", "loss_end", "seconds"):
        if not _finite_or_none(getattr(meta, field)):
            raise _bad(field, f"must be a finite number or null, got {getattr(meta, field)!r}")
    return meta
