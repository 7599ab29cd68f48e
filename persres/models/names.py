"""What `--model` may name: 'toy', a diffusers directory, a single-file checkpoint or a hub id, resolved
to what is loaded and recorded (no model library imported)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from persres.errors import ModelNotFound

TOY = "toy"
TOY_DIR = Path(__file__).parent.parent / "toy" / "model"


def resolve_model(model: str | None, configured: str | None = None) -> str:
    """The model to use: the argument, else $PERSRES_MODEL, else the registry setting, else the toy model."""
    chosen = model or os.environ.get("PERSRES_MODEL") or configured or TOY
    if chosen == TOY:
        return str(TOY_DIR)
    local = Path(chosen).expanduser()
    return str(local.resolve()) if local.is_dir() or is_single_file(chosen) else chosen  # a path is recorded absolute


HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(model: str) -> bool:
    """An original-layout checkpoint file (the AUTOMATIC1111 / ComfyUI kind), by its name."""
    return isinstance(model, str) and model.lower().endswith(SINGLE_FILE_SUFFIXES) and Path(model).expanduser().is_file()


def check_model_value(value: str) -> str:
    """What `--model` and `config model` accept: 'toy', a diffusers directory, a single-file
    checkpoint (.safetensors / .ckpt), or an org/name hub id."""
    if not isinstance(value, str) or not value.strip():
        raise ModelNotFound("the model must be 'toy', a diffusers directory or a hub id (org/name), got an empty value")
    if value == TOY:
        return value
    local = Path(value).expanduser()
    if is_single_file(value):
        from persres.models.files import single_file_family

        single_file_family(str(local))  # a checkpoint of a family persres runs, or ModelNotFound
        return str(local.resolve())
    if local.exists() or value.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelNotFound(f"model {value!r} is not a diffusers directory (no such folder)")
        if not (local / "model_index.json").is_file():
            raise ModelNotFound(f"model {value!r} is a folder without model_index.json, not a diffusers pipeline")
        return str(local.resolve())
    if not HUB_ID_RE.fullmatch(value):
        raise ModelNotFound(f"model {value!r} is neither a local diffusers directory nor a hub id of the form org/name")
    return value


def is_default_toy(model: str | None, configured: str | None = None) -> bool:
    return not (model or os.environ.get("PERSRES_MODEL") or configured)
