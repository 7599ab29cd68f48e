"""Load a diffusers pipeline of a family persres runs (SD 1.x, SD 2.x, SDXL, FLUX.1: a directory, a hub id,
a single file, or "toy") and fingerprint it.

Torch is imported inside the functions that need it: naming and resolving a model (what the
registry commands do) does not load it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from persres.errors import InputError, ModelNotFound
from persres.families import FAMILIES

if TYPE_CHECKING:
    import torch

TOY = "toy"
TOY_DIR = Path(__file__).parent / "toy" / "model"


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
        single_file_family(str(local))  # a Stable Diffusion checkpoint, or ModelNotFound
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


def pick_device(device: str | torch.device = "auto") -> torch.device:
    import torch

    if isinstance(device, torch.device):  # already chosen (a launched process's own GPU)
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class SlowPrecisionWarning(UserWarning):
    """bf16 asked for on a CPU that emulates it (no avx512_bf16 or AMX): it runs, slower than fp32."""


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX-BF16), as torch reports it."""
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:  # once per process: pick_dtype is asked more than once per command
    warnings.warn("--precision bf16 on a CPU without native bf16 (no avx512_bf16 or AMX): it runs, but slower than fp32",
                  SlowPrecisionWarning, stacklevel=3)


# On a CPU that computes bf16 natively, bf16 pays for its casts and its less tuned kernels on a
# small UNet and wins on a large one. The line between, in persres.sizes.unet_width of the UNet's
# config, from `python -m benchmarks.precision_rule` (2-core AMD EPYC with avx512_bf16; docs/
# benchmarks.md, "Precision"): a training step in bf16 takes 1.13x fp32's time on the toy model
# (width 312) and 1.19x on SD v1.4's architecture at 1/8 of its channels (362), but 0.90x at 1/4
# (725), 0.67x at 1/2 (1450) and 0.37x at full size (2900).
BF16_MIN_UNET_WIDTH = 500.0


def choose_dtype(precision: str, device: torch.device, unet_config: dict | None = None) -> tuple[torch.dtype, str]:
    """The frozen model's dtype and why, in words for the `settings:` line (residual factors,
    optimizer state and loss stay fp32 regardless).

    auto: bf16 on a GPU that has it (else fp16); on the CPU bf16 where the CPU computes it
    natively (avx512_bf16 or AMX) and the UNet is large enough for it to be faster (its
    `unet_config`; a model whose config cannot be read without loading counts as large: every
    Stable Diffusion is), else fp32. bf16 matches fp32 on the toy bench within its intervals
    (README: "Precision")."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "the GPU computes bf16"
            return torch.float16, "the GPU lacks bf16"
        if not cpu_native_bf16():
            return torch.float32, "this CPU has no native bf16"
        if unet_config is not None:
            from persres.sizes import unet_width

            try:
                width = unet_width(unet_config)
            except (TypeError, ValueError, KeyError):  # a config of another shape: counted as large
                width = BF16_MIN_UNET_WIDTH
            if width < BF16_MIN_UNET_WIDTH:
                return torch.float32, f"bf16 is slower than fp32 on this CPU for a UNet this small (width {width:.0f} < {BF16_MIN_UNET_WIDTH:.0f})"
        return torch.bfloat16, "native on this CPU, and faster than fp32 for a UNet this large"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise InputError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise InputError("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    if device.type == "cpu" and precision == "bf16" and not cpu_native_bf16():
        _warn_emulated_bf16()
    return dtypes[precision], "asked for"


def pick_dtype(precision: str, device: torch.device, unet_config: dict | None = None) -> torch.dtype:
    """The dtype `choose_dtype` picks."""
    return choose_dtype(precision, device, unet_config)[0]


def _model_json(model: str, name: str) -> dict | None:
    """A JSON file of a diffusers directory (the toy model's included) or of a hub model already in
    the local cache, read without loading or downloading anything; None where it is not there."""
    if model == TOY:
        model = str(TOY_DIR)
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
    single-file checkpoint, a model without a UNet (FLUX.1), not on this machine, or unreadable."""
    config = _model_json(model, "unet/config.json")
    return config if config is not None and "block_out_channels" in config and "layers_per_block" in config else None


def denoiser_config_of(model: str) -> dict | None:
    """The denoiser's config, read without loading: the UNet's, or a FLUX.1 transformer's."""
    config = unet_config_of(model)
    if config is not None:
        return config
    config = _model_json(model, "transformer/config.json")
    return config if config is not None and "num_single_layers" in config else None


def family_of_model(model: str) -> str | None:
    """A model's family read from its files without loading it (a single file's from its tensor
    names); None where they cannot be read here."""
    from persres.families import family_of_config

    if is_single_file(model):
        try:
            return single_file_family(model)
        except ModelNotFound:
            return None
    config = denoiser_config_of(model)
    return None if config is None else family_of_config(config)


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


FLUX_SINGLE_FILE_KEY = "single_blocks.0.linear2.weight"  # Black Forest Labs' layout, with or without "model.diffusion_model."


def single_file_family(path: str) -> str:
    """sd1, sd2, sdxl or flux from an original-layout checkpoint's tensor names (the header only for
    .safetensors); ModelNotFound for a file that is not a checkpoint of these."""
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
    if any(k.endswith(FLUX_SINGLE_FILE_KEY) for k in keys):
        return "flux"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd1"
    raise ModelNotFound(f"model {path!r} is not a Stable Diffusion or FLUX.1 checkpoint (no model.diffusion_model.* "
                        "or single_blocks.* tensors)")


def check_single_file_config(path: str, config: str | None) -> str:
    """The single file's family, after checking that `config` (if any) is a diffusers directory of it."""
    from persres.families import family_of_config, label

    family = single_file_family(path)
    if config is not None:
        denoiser_config = denoiser_config_of(str(Path(config).expanduser())) if Path(config).expanduser().is_dir() else None
        if denoiser_config is None:
            raise ModelNotFound(f"--config {config!r} is not a diffusers directory "
                                "(no readable unet/config.json or transformer/config.json)")
        if family_of_config(denoiser_config) != family:
            raise ModelNotFound(f"--config {config!r} is for {label(family_of_config(denoiser_config))}, "
                                f"but {path!r} is an {label(family)} checkpoint")
        return family
    from huggingface_hub import try_to_load_from_cache

    repo = FAMILIES[family].config_repo
    if not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):  # persres reads single files offline
        raise ModelNotFound(
            f"model {path!r} is an {label(family)} checkpoint whose diffusers configs are not on this machine: "
            f"pass --config DIR (a diffusers directory of {repo}; configs and tokenizer files suffice), or fetch them once "
            f"with `huggingface-cli download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.onnx' '*.msgpack'`"
        )
    return family


def local_snapshot(model: str, on_download=None) -> str:
    """Where `model` is read from: itself, unless it is a hub id not yet in the local cache; then it is
    downloaded first (diffusers' `DiffusionPipeline.download`: what the pipeline needs, with the hub's
    own progress bars), after `on_download(model)` is told, and its snapshot folder is returned."""
    if model == TOY or Path(model).expanduser().exists() or not HUB_ID_RE.fullmatch(model):
        return model
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return model  # cached: diffusers reads it by its id
    from huggingface_hub import constants

    fix = "download it once with network access, or pass --model /path/to/a/diffusers/directory"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"model {model!r} is not on disk and could not be fetched: HF_HUB_OFFLINE is set; {fix}")
    unreachable = hub_unreachable(constants.ENDPOINT)
    if unreachable:  # said at once, not after the hub client's retries
        raise ModelNotFound(f"model {model!r} is not on disk and could not be fetched: {constants.ENDPOINT} "
                            f"cannot be reached ({unreachable}); {fix}")
    if on_download is not None:
        on_download(model)
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.download(model))
    except Exception as e:
        raise ModelNotFound(f"model {model!r} is not on disk and could not be fetched ({type(e).__name__}); {fix}") from None


def hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to `endpoint`'s host cannot be made within `timeout` seconds (name
    lookup included), or None if it can."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or type(e).__name__)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"


def dtype_argument(dtype) -> dict:
    """`from_pretrained`'s dtype under the name this diffusers reads: `dtype` where it has replaced
    the deprecated `torch_dtype` (diffusers >= 0.36), else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _pipeline_class(family: str):
    """(pipeline class, its load options): no safety checker on SD 1.x/2.x, no watermark on SDXL."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline, dict(add_watermarker=False)
    if family == "flux":
        return FluxPipeline, {}
    return StableDiffusionPipeline, dict(safety_checker=None, requires_safety_checker=False)


def _load_single_file(path: str, config: str | None, dtype: "torch.dtype"):
    from persres.families import label

    family = check_single_file_config(path, config)
    config = None if config is None else str(Path(config).expanduser())
    cls, kwargs = _pipeline_class(family)
    try:
        if family == "flux":
            return _load_flux_single_file(path, config, dtype)
        return cls.from_single_file(path, config=config, local_files_only=True, **dtype_argument(dtype), **kwargs)
    except Exception as e:
        source = f"the configs of {config!r}" if config is not None else f"the cached configs of {FAMILIES[family].config_repo}"
        raise ModelNotFound(f"model {path!r} ({label(family)}) did not load with {source} "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def _load_flux_single_file(path: str, config: str | None, dtype: "torch.dtype"):
    """A FLUX.1 single file is its transformer in Black Forest Labs' layout (flux1-dev.safetensors, what
    ComfyUI loads as a diffusion model): diffusers converts it, the rest of the pipeline (VAE, CLIP,
    T5, scheduler) comes from the configs directory or the cached FLUX.1-dev repo."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    source = config or FAMILIES["flux"].config_repo
    transformer = FluxTransformer2DModel.from_single_file(path, config=source, subfolder="transformer", local_files_only=True,
                                                          **dtype_argument(dtype))
    return FluxPipeline.from_pretrained(source, transformer=transformer, local_files_only=True, **dtype_argument(dtype))


def load_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  config: str | None = None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline with a DDIM scheduler, no safety
    checker or watermark, or a FluxPipeline with its own flow-matching scheduler; frozen and in eval mode. `model` is a diffusers directory, a hub id,
    or a single-file checkpoint; `config` (a diffusers directory) supplies a single file's configs."""
    import torch
    from diffusers import DDIMScheduler

    from persres.conditioning import text_encoders
    from persres.families import FAMILIES, PIPELINES, denoiser

    if model == TOY:
        model = str(TOY_DIR)
    local = Path(model)
    if model == str(TOY_DIR) and not local.is_dir():
        raise ModelNotFound("the toy model is not built in this install; run `python -m persres.toy.build` or pass --model")
    # bf16 keeps too few bits to fingerprint the weights it holds (fp16 rounding of fp32 and of
    # bf16 values differ): such a pipeline is loaded in fp32, fingerprinted, then cast
    dtype = dtype or torch.float32
    load_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    try:
        if is_single_file(model):
            pipe = _load_single_file(model, config, load_dtype)
        elif not local.is_dir() and (local.exists() or model.startswith((".", "/", "~"))):
            raise ModelNotFound(f"model {model!r} is neither a diffusers directory nor a .safetensors / .ckpt checkpoint")
        else:
            class_name = pipeline_class_name(model)
            if class_name not in PIPELINES:
                raise ModelNotFound(f"model {model!r} is a {class_name or 'pipeline of no declared class'}; "
                                    f"persres runs {', '.join(PIPELINES)} models (SD 1.x, SD 2.x, SDXL, FLUX.1)")
            cls, kwargs = _pipeline_class(next(k for k, f in FAMILIES.items() if f.pipeline == class_name))  # sd1/sd2 share one
            pipe = cls.from_pretrained(model, local_files_only=local.is_dir(), **dtype_argument(load_dtype), **kwargs)
    except ModelNotFound:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError... for missing weights
        raise ModelNotFound(
            f"model {model!r} is not on disk and could not be fetched ({type(e).__name__}); "
            "download it once with network access, or pass --model /path/to/a/diffusers/directory"
        ) from None
    if getattr(pipe, "unet", None) is not None:  # FLUX keeps its flow-matching Euler scheduler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for part in (denoiser(pipe), pipe.vae, *text_encoders(pipe)):
        part.requires_grad_(False)
        part.eval()
    if dtype != load_dtype:
        source = fingerprint(denoiser(pipe))
        pipe = pipe.to(dtype=dtype)
        denoiser(pipe).persres_source_fingerprint = source  # what `fingerprint` answers for this denoiser
    return pipe.to(device)


@dataclass(frozen=True)
class Fingerprint:
    architecture: str  # transformer blocks, their channels and proj_out kind
    weights: str  # the proj_out weights themselves

    def short(self) -> str:
        return f"{self.architecture[:12]}/{self.weights[:12]}"


def fingerprint(unet) -> Fingerprint:
    """What packs record and are checked against: the model's architecture and its proj_out
    weights, the same whether it was loaded in fp32, fp16 or (by load_pipeline) bf16."""
    from persres.residuals import base_layer_of, block_channels, block_in_channels, transformer_blocks

    source = getattr(unet, "persres_source_fingerprint", None)  # set by load_pipeline on a UNet it cast
    if isinstance(source, Fingerprint):
        return source

    blocks = transformer_blocks(unet)
    channels, ins = block_channels(unet), block_in_channels(unet)
    arch = [(name, channels[name], type(base_layer_of(b.proj_out)).__name__) + ((ins[name],) if name in ins else ())
            for name, b in sorted(blocks.items())]
    arch_hash = hashlib.sha256(json.dumps(arch).encode()).hexdigest()
    weights = {}
    for name, b in blocks.items():
        weight = getattr(b.proj_out, "_original_weight", None)  # unmerged, if residuals are folded in
        weights[name] = base_layer_of(b.proj_out).weight if weight is None else weight
    return Fingerprint(arch_hash, weights_digest(weights))


def weights_digest(proj_out: dict[str, torch.Tensor]) -> str:
    """`Fingerprint.weights`: the proj_out weights, by block name in sorted order, hashed
    rounded to fp16 so that the same checkpoint loaded in fp16 or fp32 has one fingerprint."""
    import torch

    h = hashlib.sha256()
    for name in sorted(proj_out):
        h.update(proj_out[name].detach().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
UNET_INDEX = UNET_WEIGHTS + ".index.json"  # a sharded UNet: {"weight_map": {key: shard file}}
FLUX_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
FLUX_INDEX = FLUX_WEIGHTS + ".index.json"
FLUX_BLOCK_RE = re.compile(r"single_transformer_blocks\.\d+")


def _unet_file(model: str, name: str) -> Path | None:
    """A file of the model's UNet on disk: in a diffusers directory, or in the hub cache for a hub id."""
    local = Path(model)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    if not HUB_ID_RE.fullmatch(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, name)
    return Path(found) if isinstance(found, str) else None


def _proj_out_tensors(model: str) -> dict[str, torch.Tensor] | None:
    """{block name: proj_out weight} read from the UNet's safetensors alone (no pipeline built), or
    None where the weights are not safetensors on disk (a single file, .bin weights, not cached)."""
    from safetensors import safe_open

    flux = _unet_file(model, FLUX_INDEX) is not None or _unet_file(model, FLUX_WEIGHTS) is not None
    index = _unet_file(model, FLUX_INDEX if flux else UNET_INDEX)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {key: index.parent / shard for key, shard in weight_map.items()}
    else:
        single = _unet_file(model, FLUX_WEIGHTS if flux else UNET_WEIGHTS)
        if single is None:
            return None
        with safe_open(str(single), "pt") as f:
            files = {key: single for key in f.keys()}
    # the blocks `residuals.transformer_blocks` finds: FLUX's single-stream blocks, or a UNet's
    # modules with both proj_out and transformer_blocks
    blocks = {k.removesuffix(".proj_out.weight") for k in files if k.endswith(".proj_out.weight")}
    if flux:
        blocks = {b for b in blocks if FLUX_BLOCK_RE.fullmatch(b)}
    else:
        blocks = {b for b in blocks if any(k.startswith(f"{b}.transformer_blocks.") for k in files)}
    by_file: dict[Path, list[str]] = {}
    for block in blocks:
        by_file.setdefault(files[f"{block}.proj_out.weight"], []).append(block)
    tensors = {}
    for path, in_file in by_file.items():  # each file opened once
        with safe_open(str(path), "pt") as f:
            tensors |= {block: f.get_tensor(f"{block}.proj_out.weight") for block in in_file}
    return tensors


def base_weights(model: str, model_config: str | None = None, pipe=None) -> str:
    """`Fingerprint.weights` of the model at `model` as it is now (what a pack trained on it records):
    from `pipe` if given, else read from the UNet's safetensors, else by loading the pipeline on the CPU.
    What tells packs trained on other weights at the same path from packs trained on these."""
    from persres.families import denoiser

    if pipe is not None:
        return fingerprint(denoiser(pipe)).weights
    try:
        tensors = None if is_single_file(model) else _proj_out_tensors(model)
    except Exception:  # a damaged file or index: the pipeline load below reports it in one line
        tensors = None
    if tensors is None:
        return fingerprint(denoiser(load_pipeline(model, config=model_config))).weights
    return weights_digest(tensors)
