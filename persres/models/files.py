"""A model's files read without loading it: its configs, its family, a single file's kind, the
residual-carrying weights (what a pack's fingerprint is checked against)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from persres import families
from persres.errors import ModelNotFound
from persres.models import names
from persres.models.names import HUB_ID_RE, TOY, is_single_file

if TYPE_CHECKING:
    import torch


def _model_json(model: str, name: str) -> dict | None:
    """A JSON file of a diffusers directory (the toy model's included) or of a hub model already in
    the local cache, read without loading or downloading anything; None where it is not there."""
    if model == TOY:
        model = str(names.TOY_DIR)
    local = Path(model).expanduser()
    if local.is_dir():
        path = local / name
    elif HUB_ID_RE.fullmatch(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, name)
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    else:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def unet_config_of(model: str) -> dict | None:
    """The UNet's config of a diffusers directory or a cached hub model (see `_model_json`); None for a
    single-file checkpoint, a model without a UNet, not on this machine, or unreadable."""
    config = _model_json(model, "unet/config.json")
    return config if config is not None and "block_out_channels" in config and "layers_per_block" in config else None


def denoiser_config_of(model: str) -> tuple[families.Family, dict] | None:
    """(family, its denoiser's config) of a diffusers directory or a cached hub model, read without
    loading; None where no family's denoiser config is there."""
    read: dict[str, dict | None] = {}

    def read_json(name: str) -> dict | None:
        if name not in read:
            read[name] = _model_json(model, name)
        return read[name]

    for family in families.DETECTION:  # its order decides where two families' rules both match
        config = family.denoiser_config_of(read_json)
        if config is not None:
            return family, config
    return None


def pipeline_config_of(model: str) -> dict | None:
    """A diffusers directory's or cached hub model's model_index.json, read without loading; None where absent."""
    return _model_json(model, "model_index.json")


def family_of_model(model: str) -> families.Family | None:
    """A model's family read from its files without loading it (a single file's from its tensor
    names); None where they cannot be read here."""
    if is_single_file(model):
        try:
            return single_file_family(model)
        except ModelNotFound:
            return None
    found = denoiser_config_of(model)
    return None if found is None else found[0]


def pipeline_class_name(model: str) -> str:
    """The pipeline class a model directory or hub id declares in its model_index.json."""
    from diffusers import DiffusionPipeline

    local = Path(model)
    index = local / "model_index.json"
    if local.is_dir():
        try:
            return json.loads(index.read_text()).get("_class_name", "")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelNotFound(f"model {model!r} has no readable model_index.json ({type(e).__name__})") from None
    return DiffusionPipeline.load_config(model).get("_class_name", "")


def single_file_family(path: str) -> families.Family:
    """The family of an original-layout checkpoint, from its tensor names (the header only for
    .safetensors); ModelNotFound for a file that is not a checkpoint of a family persres runs."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        else:
            import torch

            keys = list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {}))
    except Exception as e:  # a damaged header, a pickle that is not a state dict, ...
        raise ModelNotFound(f"model {path!r} is not a readable checkpoint ({type(e).__name__})") from None
    family = families.of_checkpoint(keys)
    if family is not None:
        return family
    raise ModelNotFound(f"model {path!r} is not a checkpoint of {families.described()} (none of their tensor names)")


def check_single_file_config(path: str, config: str | None) -> families.Family:
    """The single file's family, after checking that `config` (if any) is a diffusers directory of it."""
    family = single_file_family(path)
    if config is not None:
        found = denoiser_config_of(str(Path(config).expanduser())) if Path(config).expanduser().is_dir() else None
        if found is None:
            folders = " or ".join(sorted({f"{f.denoiser_folder}/config.json" for f in families.FAMILIES.values()}, reverse=True))
            raise ModelNotFound(f"--config {config!r} is not a diffusers directory (no readable {folders})")
        if found[0] is not family:
            raise ModelNotFound(f"--config {config!r} is for {found[0].label}, but {path!r} is an {family.label} checkpoint")
        return family
    from huggingface_hub import try_to_load_from_cache

    repo = family.config_repo
    if not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):  # persres reads single files offline
        raise ModelNotFound(
            f"model {path!r} is an {family.label} checkpoint whose diffusers configs are not on this machine: "
            f"pass --config DIR (a diffusers directory of {repo}; configs and tokenizer files suffice), or fetch them once "
            f"with `huggingface-cli download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.onnx' '*.msgpack'`"
        )
    return family


def _model_file(model: str, name: str) -> Path | None:
    """A file of the model on disk: in a diffusers directory, or in the hub cache for a hub id."""
    local = Path(model)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    if not HUB_ID_RE.fullmatch(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, name)
    return Path(found) if isinstance(found, str) else None


WEIGHTS = "diffusion_pytorch_model.safetensors"  # a denoiser's weights in a diffusers directory
INDEX = WEIGHTS + ".index.json"  # sharded: {"weight_map": {key: shard file}}


def proj_out_tensors(model: str) -> dict[str, torch.Tensor] | None:
    """{block name: proj_out weight} read from the denoiser's safetensors alone (no pipeline built), or
    None where the weights are not safetensors on disk (a single file, .bin weights, not cached)."""
    from safetensors import safe_open

    family = family_of_model(model)
    if family is None:
        return None
    folder = family.denoiser_folder
    index = _model_file(model, f"{folder}/{INDEX}")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {key: index.parent / shard for key, shard in weight_map.items()}
    else:
        single = _model_file(model, f"{folder}/{WEIGHTS}")
        if single is None:
            return None
        with safe_open(str(single), "pt") as f:
            files = {key: single for key in f.keys()}
    blocks = family.block_names_in(files)  # the blocks `residuals.transformer_blocks` finds
    by_file: dict[Path, list[str]] = {}
    for block in blocks:
        by_file.setdefault(files[f"{block}.{family.projection}.weight"], []).append(block)
    tensors = {}
    for path, in_file in by_file.items():  # each file opened once
        with safe_open(str(path), "pt") as f:
            tensors |= {block: f.get_tensor(f"{block}.{family.projection}.weight") for block in in_file}
    return tensors


def check_model_value(value: str) -> str:
    """What `--model` and `config model` accept: 'toy', a diffusers directory, a single-file
    checkpoint (.safetensors / .ckpt), or an org/name hub id."""
    if not isinstance(value, str) or not value.strip():
        raise ModelNotFound("the model must be 'toy', a diffusers directory or a hub id (org/name), got an empty value")
    if value == TOY:
        return value
    local = Path(value).expanduser()
    if is_single_file(value):
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
