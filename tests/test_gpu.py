"""CUDA-only checks (skipped on CPU): half-precision training and sampling on the tiny model."""

import math

import pytest
import torch

from persres import residuals
from persres.config import SampleConfig, TrainConfig
from persres.models import load_pipeline
from persres.sample import generate
from persres.tokens import BoundConcept
from persres.train import train_residuals

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training_keeps_fp32_factors_and_finite_losses(tiny_model, concept_dir, dtype):
    from persres.images import read_folder

    pipe = load_pipeline(str(tiny_model), "cuda", dtype)
    images = [r.image for r in read_folder(concept_dir)]
    result = train_residuals(pipe, images, "sks", "circle", TrainConfig(steps=5, lr=1e-2, device="cuda"))
    assert all(math.isfinite(x) for x in result.losses)
    assert all(t.dtype == torch.float32 for t in result.tensors.values())


@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_lag_sampling_on_cuda_in_fp16(tiny_model, backend):
    from persres.kernels import available_backends

    if backend not in [b.value for b in available_backends()]:
        pytest.skip(f"{backend} not installed")
    pipe = load_pipeline(str(tiny_model), "cuda", torch.float16)
    residuals.new_concept(pipe.unet, "a", residuals.ranks_for(pipe.unet), init="random")
    concept = BoundConcept("a", "sks", "circle")
    out = generate(pipe, "a sks circle", [concept], SampleConfig(steps=3, lag=True, save_masks=True), backend=backend)
    assert out.images[0].size == (16, 16)
    assert 0 < out.masks["a"][0].mean() < 1
