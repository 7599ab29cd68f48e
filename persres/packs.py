"""Concept packs: safetensors files that describe themselves.

Tensors: "{block}.up" (A_i, m x r) and "{block}.down" (B_i, r x m) per transformer block, and,
for a LoRA of other layers, "{layer}.up" (m x r) and "{layer}.down" (r x n, or r x n x kh x kw
on a convolution) per layer named "{component}.{module path}" (`persres.layers`).
Metadata (string to string, as safetensors requires): `persres.format_version`, one JSON
key `persres.config` holding `PackMeta`, so `safe_open(...).metadata()` indexes a pack
without loading its tensors and `persres import` rebuilds the registry row from the file,
and `persres.content_sha256`: the sha256 of the metadata and every tensor (name, dtype,
shape, bytes), so that any changed bit, in a tensor or in the header, is caught on read.
Format 1 packs (persres 0.1) carry no content hash and are read with a warning.
Metadata is validated field by field (`validate_meta`) before anything trusts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from persres.errors import PackError
from persres.names import layer_parameter_count, parameter_count
from persres.pack_fields import validate_meta

if TYPE_CHECKING:  # packs are indexed (registry rows, metadata) without torch; tensors need it
    import torch

FORMAT_VERSION = "2"
LAYERS_VERSION = "3"  # a pack with layers other than proj_out, or one that acts everywhere: older persres refuse it by name
LEGACY_VERSIONS = ("1",)  # readable, without a content hash
CURRENT_VERSIONS = (FORMAT_VERSION, LAYERS_VERSION)
VERSION_KEY = "persres.format_version"
CONFIG_KEY = "persres.config"
CONTENT_KEY = "persres.content_sha256"


# What format-1 writers (persres 0.1) put in a pack: these two metadata keys, and PackMeta's
# fields of that time as `json.dumps(..., sort_keys=True)` writes them. A "format 1" pack
# that differs was not written by one (a format-2 pack with its hash stripped, or a forgery).
FORMAT1_KEYS = frozenset({VERSION_KEY, CONFIG_KEY})
FORMAT1_FIELDS = frozenset({"name", "identifier", "class_word", "ranks", "channels", "parameter_count", "base_model",
                            "architecture", "weights", "proj_out", "train_config", "image_hashes", "created_at",
                            "loss_start", "loss_end", "seconds"})


class UnverifiedPackWarning(UserWarning):
    """A format-1 pack: it carries no content hash, so changed bytes cannot be detected."""


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
    proj_out: str = "Conv2d"  # the base model's proj_out kind: Conv2d or Linear
    family: str = ""  # the model family's key (`persres.families`); "" in packs older than the field (`families.of_meta` infers it)
    in_channels: dict[str, int] = field(default_factory=dict)  # block -> n where proj_out is m x n, n != m
    layers: dict[str, list[int]] = field(default_factory=dict)  # other layers: "{component}.{path}" -> [rank, m, n(, kh, kw)]
    everywhere: bool = False  # acts at every position under LAG (a style), not in a region of its own
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
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        return validate_meta(cls(**{k: v for k, v in data.items() if k in known}))

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for block, r in self.ranks.items():
            m = self.channels[block]
            shapes[f"{block}.up"] = (m, r)
            shapes[f"{block}.down"] = (r, self.in_channels.get(block, m))
        for layer, (r, m, *rest) in self.layers.items():
            shapes[f"{layer}.up"] = (m, r)
            shapes[f"{layer}.down"] = (r, *rest)
        return shapes

    @property
    def version(self) -> str:
        """The pack format this metadata needs."""
        return LAYERS_VERSION if self.layers or self.everywhere else FORMAT_VERSION


def training_record(config, prompt: str, resolution: int, prediction_type: str, config_digest: str, *,
                    sources: dict[str, str] | None = None, class_info: dict | None = None) -> dict:
    """`PackMeta.train_config` of a trained pack: every `TrainConfig` field, then how it was applied
    (prompt template and prompt, resolution, where each setting came from, how the class word was
    chosen, what the denoiser predicts, the digest train-many skips done rows by)."""
    return {**config.to_dict(), "prompt_template": config.prompt, "resolution": resolution, "prompt": prompt,
            **{k: v for k, v in {"sources": sources, **(class_info or {"class_source": "given"})}.items() if v},
            "prediction_type": prediction_type, "config_digest": config_digest}


def import_record(fmt: str, source_file: str) -> dict:
    """`PackMeta.train_config` of a pack made from another tool's LoRA file."""
    return {"imported_from": fmt, "source_file": source_file}


def pack_meta_for(pipe, fingerprint, base_model: str, name: str, identifier: str, class_word: str, ranks: dict[str, int],
                  train_config: dict, image_hashes=(), losses=(), seconds: float | None = None,
                  checkpoint: Path | None = None, layers: dict[str, list[int]] | None = None, everywhere: bool = False) -> PackMeta:
    """What a pack of the model `pipe` (loaded from `base_model`, `fingerprint` its `models.Fingerprint`)
    says about itself: the one place a new pack's metadata is made. `checkpoint`: the single file
    it was loaded from, whose hash the pack records too."""
    import datetime as dt

    from persres import families
    from persres.residuals import block_channels, block_in_channels, proj_out_kind

    family = families.of(pipe)
    model = family.denoiser(pipe)
    channels, in_channels = block_channels(model), block_in_channels(model)
    if checkpoint is not None:
        train_config = {**train_config, "checkpoint_sha256": sha256_file(checkpoint)}
    return PackMeta(
        name=name, identifier=identifier, class_word=class_word, ranks=dict(ranks), channels=channels,
        parameter_count=parameter_count(ranks, channels, in_channels) + layer_parameter_count(layers or {}), base_model=base_model,
        architecture=fingerprint.architecture, weights=fingerprint.weights, proj_out=proj_out_kind(model), family=family.key,
        in_channels=in_channels, train_config=train_config, image_hashes=list(image_hashes),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        loss_start=losses[0] if losses else None, loss_end=losses[-1] if losses else None, seconds=seconds,
        layers=dict(layers or {}), everywhere=everywhere,
    )


def content_sha256(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 of the metadata JSON and of every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_pack(path: Path, tensors: dict[str, torch.Tensor], meta: PackMeta) -> str:
    """Write atomically; returns the file's sha256."""
    tmp, digest = write_pack_temp(path.parent, tensors, meta, stem=path.name)
    os.replace(tmp, path)
    return digest


def temp_name_prefix(stem: str) -> str:
    """Temporary pack files are `.STEM.PID.*.tmp`: a sweep can tell whose writer is gone."""
    return f".{stem}.{os.getpid()}."


def write_pack_temp(folder: Path, tensors: dict[str, torch.Tensor], meta: PackMeta, stem: str = "pack") -> tuple[Path, str]:
    """Write the pack under a unique temporary name in `folder`, fsynced; returns (path, file sha256).

    The caller moves it into place (never over another file) or removes it.
    """
    from safetensors.torch import save_file

    validate_meta(meta)
    _check(tensors, meta, meta.name)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = meta.to_json()
    metadata = {VERSION_KEY: meta.version, CONFIG_KEY: meta_json, CONTENT_KEY: content_sha256(tensors, meta_json)}
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(stem), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        return Path(tmp), sha256_file(Path(tmp))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_regular_file(path: Path, what: str = "pack file") -> None:
    """Refuse what would hang or mislead a reader: FIFOs, devices, sockets, folders."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PackError(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise PackError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise PackError(f"{what} {str(path)!r} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise PackError(f"{what} {str(path)!r} is not a regular file (a pipe, device or socket)")


def file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's string metadata (any file persres reads: packs and LoRAs)."""
    from safetensors import safe_open

    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise PackError(f"{str(path)!r} is not a readable pack (truncated or not safetensors: {_one_line(e)})") from None


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise PackError(f"pack file {str(path)!r} does not exist") from None
    except Exception as e:
        raise PackError(f"{str(path)!r} is not a readable pack (truncated or not safetensors: {_one_line(e)})") from None
    version = metadata.get(VERSION_KEY)
    if version is None or CONFIG_KEY not in metadata:
        raise PackError(f"{str(path)!r} is a safetensors file but not a persres pack (no {CONFIG_KEY} metadata)")
    if version not in CURRENT_VERSIONS and version not in LEGACY_VERSIONS:
        raise PackError(f"{str(path)!r} has pack format {version!r}; this persres reads formats "
                        f"{', '.join((*LEGACY_VERSIONS, *CURRENT_VERSIONS))}")
    if version in CURRENT_VERSIONS and CONTENT_KEY not in metadata:
        raise PackError(f"{str(path)!r} has no content hash ({CONTENT_KEY}): it was altered or damaged")
    if version in LEGACY_VERSIONS:
        _check_format1(path, metadata)
    return metadata


def _check_format1(path: Path, metadata: dict[str, str]) -> None:
    """Refuse a pack that claims format 1 but is not what a format-1 writer produced."""
    why = None
    if set(metadata) != FORMAT1_KEYS:
        why = f"it carries metadata format 1 never wrote ({', '.join(sorted(set(metadata) - FORMAT1_KEYS))})"
    else:
        try:
            config = json.loads(metadata[CONFIG_KEY])
        except ValueError:
            config = None
        if not isinstance(config, dict):
            why = "its metadata is not a JSON object"
        elif set(config) != FORMAT1_FIELDS:
            odd = sorted(set(config) ^ FORMAT1_FIELDS)[:3]
            why = f"its metadata fields differ from format 1's ({', '.join(odd)})"
        elif json.dumps(config, sort_keys=True) != metadata[CONFIG_KEY]:
            why = "its metadata is not written as format 1 wrote it"
    if why:
        raise PackError(f"{str(path)!r} claims pack format 1 but {why}: it was altered or damaged")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _parse_meta(path: Path, metadata: dict[str, str]) -> PackMeta:
    try:
        meta = PackMeta.from_json(metadata[CONFIG_KEY])
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise PackError(f"{str(path)!r} has malformed pack metadata: {_one_line(e)}") from None
    if metadata[VERSION_KEY] in CURRENT_VERSIONS and metadata[VERSION_KEY] != meta.version:
        raise PackError(f"{str(path)!r} claims pack format {metadata[VERSION_KEY]} but its metadata needs format {meta.version}: "
                        "it was altered or damaged")
    return meta


def read_meta(path: Path) -> PackMeta:
    """The pack's metadata, without loading tensors (validated, not yet checked against the content hash)."""
    return _parse_meta(path, _metadata(path))


def read_pack(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], PackMeta]:
    """Tensors and metadata, verified against each other (and against a known hash if given)."""
    from safetensors.torch import load_file

    metadata = _metadata(path)
    meta = _parse_meta(path, metadata)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise PackError(f"pack file {str(path)!r} has changed since it was registered (sha256 mismatch)")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise PackError(f"{str(path)!r} is truncated or corrupt: {_one_line(e)}") from None
    if CONTENT_KEY in metadata:
        if content_sha256(tensors, metadata[CONFIG_KEY]) != metadata[CONTENT_KEY]:
            raise PackError(f"{str(path)!r} does not match its content hash: the file was altered or damaged")
    elif expected_sha256 is None:
        warnings.warn(f"{str(path)!r} is a format-{metadata[VERSION_KEY]} pack without a content hash; "
                      "it cannot be checked for damage", UnverifiedPackWarning, stacklevel=2)
    _check(tensors, meta, str(path))
    return tensors, meta


def _check(tensors: dict[str, torch.Tensor], meta: PackMeta, where: str) -> None:
    import torch

    expected = meta.expected_shapes()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:2]
        extra = sorted(set(tensors) - set(expected))[:2]
        raise PackError(f"pack {where!r}: tensors do not match its metadata (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise PackError(f"pack {where!r}: tensor {key} has shape {tuple(tensors[key].shape)}, metadata says {shape}")
        if not tensors[key].is_floating_point():
            raise PackError(f"pack {where!r}: tensor {key} has dtype {tensors[key].dtype}, not a float type")
        if not torch.isfinite(tensors[key]).all():
            raise PackError(f"pack {where!r}: tensor {key} holds non-finite values")
