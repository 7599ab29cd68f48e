"""Base models: what `--model` names, where it comes from, how it loads, and what packs record of it.

- `names`: 'toy', a diffusers directory, a single-file checkpoint or a hub id, resolved
- `precision`: the device and dtype (`--device`, `--precision`)
- `files`: configs, family and weights read from a model's files without loading it
- `hub`: a hub id downloaded once, or refused at once
- `load`: the pipeline, set up by its family and carrying it
- `fingerprint`: the architecture and weights a pack is checked against

Torch is imported inside the functions that need it: naming and resolving a model (what the
registry commands do) does not load it.
"""

from persres.models.files import (check_model_value, check_single_file_config, denoiser_config_of, family_of_model,
                                  pipeline_class_name, single_file_family, unet_config_of)
from persres.models.fingerprint import Fingerprint, fingerprint, weights_digest
from persres.models.hub import hub_unreachable, local_snapshot
from persres.models.load import base_weights, dtype_argument, load_pipeline
from persres.models.names import HUB_ID_RE, TOY, TOY_DIR, is_default_toy, is_single_file, resolve_model
from persres.models.precision import (BF16_MIN_UNET_WIDTH, SlowPrecisionWarning, choose_dtype, cpu_native_bf16, pick_device,
                                      pick_dtype)

__all__ = ["BF16_MIN_UNET_WIDTH", "Fingerprint", "HUB_ID_RE", "SlowPrecisionWarning", "TOY", "TOY_DIR", "base_weights",
           "check_model_value", "check_single_file_config", "choose_dtype", "cpu_native_bf16", "denoiser_config_of",
           "dtype_argument", "family_of_model", "fingerprint", "hub_unreachable", "is_default_toy", "is_single_file",
           "load_pipeline", "local_snapshot", "pick_device", "pick_dtype", "pipeline_class_name", "resolve_model",
           "single_file_family", "unet_config_of", "weights_digest"]
