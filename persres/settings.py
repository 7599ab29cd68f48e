"""Where each training setting comes from, and the digests that name packs by their settings.

Precedence, one rule: the paper's defaults (`TrainConfig`), then the model's recommended
defaults (its family's, `families.Family.train_defaults`, then its own persres_defaults.json:
`ModelDefaults`), then what the user gave.
Torch-free: `persres train --help` and the registry commands read it without a model library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from persres.config import TrainConfig
from persres.errors import InputError, PersresError

PAPER_FIELDS = ("steps", "batch_size", "lr", "rank_ratio", "prompt")  # set by the paper (Sec. 4); the rest are persres's
SHOWN_FIELDS = ("steps", "batch_size", "lr", "lr_schedule", "snr_gamma", "rank_ratio", "rank", "resolution", "init", "flip", "scale_min",
                "prompt", "seed", "device", "precision")
DEFAULTS_FILE = "persres_defaults.json"  # a model directory's own recommended defaults


@dataclass(frozen=True)
class ModelDefaults:
    """What a model directory recommends in its persres_defaults.json (read once per model)."""

    train: dict  # training settings by TrainConfig field name; {} when the model has none
    class_candidates: list[str] | None  # the class words suggest-class ranks; None: the built-in nouns


def family_defaults(model: str) -> dict:
    """The training settings the model's family recommends over the paper's (`Family.train_defaults`),
    the family read from the model's files without loading it."""
    from persres.models import family_of_model

    family = family_of_model(model)
    return dict(family.train_defaults) if family is not None else {}


def read_defaults(model: str) -> ModelDefaults:
    """What a model recommends: its family's training defaults, then its directory's
    persres_defaults.json, checked (a model with its own small vocabulary, the toy model, also
    names its classes)."""
    path = Path(model) / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults(family_defaults(model), None)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    train = data.get("train", {}) if isinstance(data, dict) else None
    if not isinstance(train, dict):
        raise InputError(f"{path} must hold an object with a \"train\" object of training defaults")
    words = data.get("class_candidates")
    if words is not None and (not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words)):
        raise InputError(f"{path}: \"class_candidates\" must be a non-empty list of words")
    return ModelDefaults({**family_defaults(model), **train}, words)


def toy_defaults() -> dict:
    """The training defaults of the built-in toy model ({} in an install without it)."""
    from persres.models import TOY_DIR

    try:
        return read_defaults(str(TOY_DIR)).train
    except Exception:  # an install without the toy model: help still renders
        return {}


def model_defaults(model: str) -> dict:
    """The training defaults a model directory recommends (persres_defaults.json), or {}."""
    return read_defaults(model).train


def train_config_from(recommended: dict, overrides: dict) -> TrainConfig:
    """Paper defaults, then the model's `recommended` defaults, then the `overrides` that are not None."""
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise InputError(f"unknown training setting {unknown[0]!r} (settings: {', '.join(sorted(fields))})")
    recommended = {k: v for k, v in recommended.items() if k in fields}
    try:
        TrainConfig(**recommended)
    except PersresError as e:
        raise InputError(f"the model's {DEFAULTS_FILE} has a bad training default: {e}") from None
    return TrainConfig(**{**recommended, **given})


def train_config_for(model: str, overrides: dict) -> TrainConfig:
    """Paper defaults, then the model's own recommended defaults, then what the user gave."""
    return train_config_from(read_defaults(model).train, overrides)


def settings_sources(recommended: dict, overrides: dict) -> dict[str, str]:
    """Where each training setting comes from: "option", "model default" (its persres_defaults.json),
    "paper" or "persres"."""
    given = {k for k, v in overrides.items() if v is not None}
    return {f: "option" if f in given else "model default" if f in recommended else "paper" if f in PAPER_FIELDS else "persres"
            for f in SHOWN_FIELDS}


def effective_settings(config: TrainConfig, sources: dict[str, str], unet_config: dict | None = None) -> str:
    """One line: every training setting, its value and where it came from; auto device/precision
    resolved, and for an auto precision why (`unet_config`: the model's, where it is known)."""
    from persres.models import choose_dtype, pick_device

    device = pick_device(config.device)
    dtype, why = choose_dtype(config.precision, device, unet_config)
    values = {**config.to_dict(), "device": device.type if config.device == "auto" else config.device,
              "precision": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[str(dtype).removeprefix("torch.")]}
    parts = []
    for f in SHOWN_FIELDS:
        value = values[f]
        if value is None:
            continue
        source = "auto" if f in ("device", "precision") and getattr(config, f) == "auto" else sources[f]
        if f == "precision" and source == "auto":
            source = f"auto: {why}"
        shown = repr(value) if f == "prompt" else value
        parts.append(f"{f} {shown} ({source})")
    return ", ".join(parts)


# settings added after packs were named by this digest: at these values they leave it as it was
LATER_FIELDS = {"lr_schedule": "constant", "snr_gamma": None}


def config_digest(config: TrainConfig, model: str, weights: str | None = None) -> str:
    """A short, stable digest of (training config, base model path[, its weights' fingerprint]).

    Without `weights` it is what a pack records (train_config["config_digest"]: what was asked
    for); with them (`models.base_weights`) it also tells apart packs trained on other weights
    saved at the same path, which is what names a benchmark's own packs."""
    settings = {k: v for k, v in config.to_dict().items() if LATER_FIELDS.get(k, object()) != v}
    key = [settings, model] + ([weights] if weights is not None else [])
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def digest_name(prefix: str, key: str, config: TrainConfig, model: str, weights: str, suffix: str = "") -> str:
    """A benchmark's pack name: one pack per (concept, training config, base model and its weights),
    reused when all match ("toybench-checker_circle-1a2b3c4d", "cc101-pet_dog1-...")."""
    return f"{prefix}-{key}-{config_digest(config, model, weights)}{suffix}"
