"""Loading a pipeline of a family persres runs, frozen and in eval mode, with its family attached."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from persres import families
from persres.errors import ModelNotFound
from persres.models.files import check_single_file_config, pipeline_class_name
from persres.models.fingerprint import fingerprint, weights_digest
from persres.models import names
from persres.models.names import TOY, is_single_file

if TYPE_CHECKING:
    import torch


def dtype_argument(dtype) -> dict:
    """`from_pretrained`'s dtype under the name this diffusers reads: `dtype` where it has replaced
    the deprecated `torch_dtype` (diffusers >= 0.36), else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _load_single_file(path: str, config: str | None, dtype: "torch.dtype"):
    family = check_single_file_config(path, config)
    config = None if config is None else str(Path(config).expanduser())
    try:
        return family.load_single_file(path, config, dtype_argument(dtype))
    except Exception as e:
        source = f"the configs of {config!r}" if config is not None else f"the cached configs of {family.config_repo}"
        raise ModelNotFound(f"model {path!r} ({family.label}) did not load with {source} "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def load_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  config: str | None = None):
    """The pipeline of a family persres runs, set up by its family (`Family.prepare`: the scheduler
    persres samples with; no safety checker or watermark), frozen and in eval mode, carrying its
    family. `model` is a diffusers directory, a hub id, or a single-file checkpoint; `config` (a
    diffusers directory) supplies a single file's configs."""
    import torch

    from persres.conditioning import text_encoders

    if model == TOY:
        model = str(names.TOY_DIR)
    local = Path(model)
    if model == str(names.TOY_DIR) and not local.is_dir():
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
            declared = families.of_pipeline_class(class_name)
            if declared is None:
                raise ModelNotFound(f"model {model!r} is a {class_name or 'pipeline of no declared class'}; "
                                    f"persres runs {', '.join(families.PIPELINES)} models ({families.described(', ')})")
            cls, kwargs = declared.pipeline_class()
            pipe = cls.from_pretrained(model, local_files_only=local.is_dir(), **dtype_argument(load_dtype), **kwargs)
    except ModelNotFound:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError... for missing weights
        raise ModelNotFound(
            f"model {model!r} is not on disk and could not be fetched ({type(e).__name__}); "
            "download it once with network access, or pass --model /path/to/a/diffusers/directory"
        ) from None
    family = families.of(pipe)  # detected once, from the loaded denoiser: it travels with the pipeline
    family.prepare(pipe)
    pipe.set_progress_bar_config(disable=True)
    model = family.denoiser(pipe)
    for part in (model, pipe.vae, *text_encoders(pipe)):
        part.requires_grad_(False)
        part.eval()
    if dtype != load_dtype:
        source = fingerprint(model)
        pipe = pipe.to(dtype=dtype)
        model.persres_source_fingerprint = source  # what `fingerprint` answers for this denoiser
    return pipe.to(device)


def base_weights(model: str, model_config: str | None = None, pipe=None) -> str:
    """`Fingerprint.weights` of the model at `model` as it is now (what a pack trained on it records):
    from `pipe` if given, else read from the UNet's safetensors, else by loading the pipeline on the CPU.
    What tells packs trained on other weights at the same path from packs trained on these."""
    from persres.models.files import proj_out_tensors

    if pipe is not None:
        return fingerprint(families.denoiser(pipe)).weights
    try:
        tensors = None if is_single_file(model) else proj_out_tensors(model)
    except Exception:  # a damaged file or index: the pipeline load below reports it in one line
        tensors = None
    if tensors is None:
        return fingerprint(families.denoiser(load_pipeline(model, config=model_config))).weights
    return weights_digest(tensors)
