"""Load a diffusers Stable Diffusion v1.x pipeline (a directory, a hub id, or "toy") and fingerprint it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from persres.errors import InputError, ModelNotFound

TOY = "toy"
TOY_DIR = Path(__file__).parent / "toy" / "model"
DEFAULTS_FILE = "persres_defaults.json"  # a model's own recommended training defaults


def resolve_model(model: str | None, configured: str | None = None) -> str:
    """The model to use: the argument, else $PERSRES_MODEL, else the registry setting, else the toy model."""
    chosen = model or os.environ.get("PERSRES_MODEL") or configured or TOY
    if chosen == TOY:
        return str(TOY_DIR)
    local = Path(chosen).expanduser()
    return str(local.resolve()) if local.is_dir() else chosen  # a directory is recorded absolute


HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def check_model_value(value: str) -> str:
    """What `--model` and `config model` accept: 'toy', a diffusers directory, or an org/name hub id."""
    if not isinstance(value, str) or not value.strip():
        raise ModelNotFound("the model must be 'toy', a diffusers directory or a hub id (org/name), got an empty value")
    if value == TOY:
        return value
    local = Path(value).expanduser()
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


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise InputError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise InputError("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    return dtypes[precision]


def model_defaults(model: str) -> dict:
    """The training defaults a model directory recommends (persres_defaults.json), or {}."""
    path = Path(model) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    train = data.get("train", {}) if isinstance(data, dict) else None
    if not isinstance(train, dict):
        raise InputError(f"{path} must hold an object with a \"train\" object of training defaults")
    return train


def load_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline with a DDIM scheduler, no safety checker, frozen and in eval mode."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if model == TOY:
        model = str(TOY_DIR)
    local = Path(model)
    if model == str(TOY_DIR) and not local.is_dir():
        raise ModelNotFound("the toy model is not built in this install; run `python -m persres.toy.build` or pass --model")
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if local.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(local, local_files_only=True, **kwargs)
        elif local.exists() or model.startswith((".", "/", "~")):
            raise ModelNotFound(f"model {model!r} is not a diffusers directory")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except ModelNotFound:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError... for missing weights
        raise ModelNotFound(
            f"model {model!r} is not on disk and could not be fetched ({type(e).__name__}); "
            "download it once with network access, or pass --model /path/to/a/diffusers/directory"
        ) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    return pipe.to(device)


@dataclass(frozen=True)
class Fingerprint:
    architecture: str  # transformer blocks, their channels and proj_out kind
    weights: str  # the proj_out weights themselves

    def short(self) -> str:
        return f"{self.architecture[:12]}/{self.weights[:12]}"


def fingerprint(unet) -> Fingerprint:
    from persres.residuals import base_layer_of, block_channels, transformer_blocks

    blocks = transformer_blocks(unet)
    channels = block_channels(unet)
    arch = [(name, channels[name], type(base_layer_of(b.proj_out)).__name__) for name, b in sorted(blocks.items())]
    arch_hash = hashlib.sha256(json.dumps(arch).encode()).hexdigest()
    h = hashlib.sha256()
    for name, b in sorted(blocks.items()):
        weight = getattr(b.proj_out, "_original_weight", None)  # unmerged, if residuals are folded in
        weight = base_layer_of(b.proj_out).weight if weight is None else weight
        # rounded to fp16 so that the same checkpoint loaded in fp16 or fp32 has one fingerprint
        h.update(weight.detach().to(torch.float16).cpu().numpy().tobytes())
    return Fingerprint(arch_hash, h.hexdigest())
