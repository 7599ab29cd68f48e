"""Concept packs: safetensors files that describe themselves.

Tensors: "{block}.up" (A_i, m x r) and "{block}.down" (B_i, r x m) per transformer block.
Metadata (string to string, as safetensors requires): `persres.format_version` and one
JSON key `persres.config` holding `PackMeta`, so `safe_open(...).metadata()` indexes a pack
without loading its tensors and `persres import` rebuilds the registry row from the file.
Writes go to a temporary file in the same folder, are fsynced, then renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from persres.errors import PackError

FORMAT_VERSION = "1"
VERSION_KEY = "persres.format_version"
CONFIG_KEY = "persres.config"


@dataclass(frozen=True)
class PackMeta:
    """Everything a pack says about itself (one schema, one version number)."""

    name: str
    identifier: str
    class_word: str
    ranks: dict[str, int]  # block -> rank
    channels: dict[str, int]  # block -> m
    parameter_count: int
    base_model: str
    architecture: str  # sha256 of the blocks, channels and proj_out kind
    weights: str  # sha256 of the base model's proj_out weights
    proj_out: str = "Conv2d"  # the base model's proj_out kind: Conv2d (SD 1.x) or Linear (SD 2.x/XL)
    train_config: dict = field(default_factory=dict)
    image_hashes: list[str] = field(default_factory=list)
    created_at: str = ""
    loss_start: float | None = None
    loss_end: float | None = None
    seconds: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PackMeta":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for block, r in self.ranks.items():
            m = self.channels[block]
            shapes[f"{block}.up"] = (m, r)
            shapes[f"{block}.down"] = (r, m)
        return shapes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_pack(path: Path, tensors: dict[str, torch.Tensor], meta: PackMeta) -> str:
    """Write atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    _check(tensors, meta, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={VERSION_KEY: FORMAT_VERSION, CONFIG_KEY: meta.to_json()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def read_meta(path: Path) -> PackMeta:
    """The pack's metadata, without loading tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise PackError(f"pack file {str(path)!r} does not exist") from None
    except Exception as e:
        raise PackError(f"{str(path)!r} is not a readable pack (truncated or not safetensors: {e})") from None
    version = metadata.get(VERSION_KEY)
    if version is None or CONFIG_KEY not in metadata:
        raise PackError(f"{str(path)!r} is a safetensors file but not a persres pack (no {CONFIG_KEY} metadata)")
    if version != FORMAT_VERSION:
        raise PackError(f"{str(path)!r} has pack format {version}; this persres reads format {FORMAT_VERSION}")
    try:
        return PackMeta.from_json(metadata[CONFIG_KEY])
    except (TypeError, ValueError) as e:
        raise PackError(f"{str(path)!r} has malformed pack metadata: {e}") from None


def read_pack(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], PackMeta]:
    """Tensors and metadata, verified against each other (and against a known hash if given)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise PackError(f"pack file {str(path)!r} has changed since it was registered (sha256 mismatch)")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise PackError(f"{str(path)!r} is truncated or corrupt: {e}") from None
    _check(tensors, meta, str(path))
    return tensors, meta


def _check(tensors: dict[str, torch.Tensor], meta: PackMeta, where: str) -> None:
    expected = meta.expected_shapes()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:2]
        extra = sorted(set(tensors) - set(expected))[:2]
        raise PackError(f"pack {where!r}: tensors do not match its metadata (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise PackError(f"pack {where!r}: tensor {key} has shape {tuple(tensors[key].shape)}, metadata says {shape}")
        if not torch.isfinite(tensors[key]).all():
            raise PackError(f"pack {where!r}: tensor {key} holds non-finite values")
