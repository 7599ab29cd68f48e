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


def is_default_toy(model: str | None, configured: str | None = None) -> bool:
    return not (model or os.environ.get("PERSRES_MODEL") or configured)
