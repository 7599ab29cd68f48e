"""Sampling with personalized residuals, with or without LAG, for one or several concepts.

Without LAG the residuals of the prompt's concepts are folded into the proj_out weights for
the call (`use_concepts(merged=True)`), so a personalized model samples at the base model's
speed. With LAG they stay unmerged and act only in their concepts' regions, found from the
cross-attention of the same UNet evaluation (`persres.lag`). Each image i of a call uses
seed + i, so `-n 1 --seed S` reproduces any one of them from its PNG metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from persres import residuals
from persres.config import SampleConfig
from persres.errors import IncompatiblePack, InputError, PromptError
from persres.families import family_of, family_of_meta, label
from persres.kernels import Backend, attention_backend, resolve_backend
from persres.lag import ConceptTokens, lag_regions
from persres.models import Fingerprint, fingerprint
from persres.packs import PackMeta
from persres.tokens import BoundConcept, concept_span

MASK_COLORS = [(0, 220, 255), (255, 0, 200), (255, 230, 0), (0, 230, 90), (255, 120, 0)]  # cyan first: visible on most objects


class OtherCheckpointWarning(UserWarning):
    """A pack trained on another checkpoint of the same architecture (SD 1.4 vs 1.5, say)."""


@dataclass
class Generated:
    images: list[Image.Image]
    seeds: list[int]
    prompt: str  # expanded: identifiers in place of placeholders
    masks: dict[str, list[np.ndarray]] = field(default_factory=dict)  # concept -> per image (h, w) in [0, 1]


def check_fit(meta: PackMeta, fp: Fingerprint, model: str, family: str | None = None) -> None:
    """Refuse a pack of another architecture (naming both families); warn for another checkpoint of the same one."""
    if meta.architecture != fp.architecture:
        ours, theirs = family_of_meta(meta), family or "another architecture"
        kind = f"an {label(ours)} pack" if ours == theirs or family is None else f"an {label(ours)} pack, not {label(theirs)}"
        raise IncompatiblePack(
            f"pack {meta.name!r} is {kind}: it was trained on {meta.base_model!r} (architecture {meta.architecture[:12]}), "
            f"which does not fit {model!r} ({label(theirs)}, architecture {fp.architecture[:12]})"
        )
    if meta.weights != fp.weights:
        warnings.warn(
            f"pack {meta.name!r} was trained on another checkpoint ({meta.base_model!r}) of this architecture; "
            "it loads, but results may differ",
            OtherCheckpointWarning,
            stacklevel=2,
        )


def apply_pack(pipe, tensors: dict[str, torch.Tensor], meta: PackMeta, model: str | None = None, fp: Fingerprint | None = None) -> None:
    """Load a pack's residuals onto a diffusers pipeline you already hold (checked for fit)."""
    check_fit(meta, fp or fingerprint(pipe.unet), model or pipe.config.get("_name_or_path", "this model"), family_of(pipe))
    if meta.name in residuals.loaded_concepts(pipe.unet):
        residuals.unload_concept(pipe.unet, meta.name)
    residuals.load_concept(pipe.unet, meta.name, tensors)


def concept_tokens(tokenizer, prompt: str, concepts: Sequence[BoundConcept]) -> list[ConceptTokens]:
    """Each concept's token positions in the prompt (shared with training and the CLI)."""
    seen: dict[str, str] = {}
    for c in concepts:
        if c.identifier in seen:
            raise PromptError(f"concepts {seen[c.identifier]!r} and {c.name!r} share the identifier {c.identifier!r}; they cannot appear in one prompt")
        seen[c.identifier] = c.name
    spans = [concept_span(tokenizer, prompt, c.identifier, c.class_word) for c in concepts]
    return [ConceptTokens(c.name, span.positions, span.class_word) for c, span in zip(concepts, spans)]


SAMPLE_BATCH = 8  # images per UNet batch: a large -n is sampled in chunks, not all at once


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    concepts: Sequence[BoundConcept] = (),
    config: SampleConfig = SampleConfig(),
    backend: str | None = None,
    on_step=None,
) -> Generated:
    """Sample `config.num_images` images of an expanded prompt with the given (loaded) concepts.

    `on_step(done, total)` is called after every denoising step (for a progress bar).
    """
    tokens = concept_tokens(pipe.tokenizer, prompt, concepts)
    limit = pipe.scheduler.config.get("num_train_timesteps", 1000)
    if config.steps > limit:
        raise InputError(f"--steps must be <= {limit} (the scheduler's training timesteps), got {config.steps}")
    height = config.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = config.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    seeds = [config.seed + i for i in range(config.num_images)]
    images: list[Image.Image] = []
    masks: dict[str, list[np.ndarray]] = {}
    total = config.num_images * config.steps
    for start in range(0, len(seeds), SAMPLE_BATCH):
        chunk = seeds[start : start + SAMPLE_BATCH]
        callback = None
        if on_step is not None:
            def callback(pipeline, step, timestep, kwargs, _done=start * config.steps, _n=len(chunk)):
                on_step(_done + (step + 1) * _n, total)
                return kwargs
        chunk_images, chunk_masks = _sample(pipe, prompt, concepts, tokens, config, backend, chunk, height, width, callback)
        images += chunk_images
        for name, per_image in chunk_masks.items():
            masks.setdefault(name, []).extend(per_image)
    return Generated(images, seeds, prompt, masks)


def _sample(pipe, prompt, concepts, tokens, config: SampleConfig, backend, seeds, height, width, callback):
    device = pipe.unet.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    call = dict(
        prompt=prompt, num_inference_steps=config.steps, guidance_scale=config.guidance, eta=config.eta,
        num_images_per_prompt=len(seeds), generator=generators, height=height, width=width,
    )
    if callback is not None:
        call["callback_on_step_end"] = callback
    names = [c.name for c in concepts]
    masks: dict[str, list[np.ndarray]] = {}
    session = None
    with ExitStack() as stack:
        if residuals.layers_of(pipe.unet):  # loaded concepts the prompt does not name stay off
            strengths = {c.name: c.strength for c in concepts}
            stack.enter_context(residuals.use_concepts(pipe.unet, names, merged=not config.lag, strengths=strengths))
        if config.lag:
            latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            session = stack.enter_context(lag_regions(pipe.unet, tokens, cfg=config.guidance > 1, backend=backend,
                                                      latent_hw=latent_hw, keep_masks=config.save_masks,
                                                      multi=config.multi, steps=config.steps))
        elif resolve_backend(backend) is not Backend.SDPA:  # diffusers' default already is SDPA
            stack.enter_context(attention_backend(pipe.unet, backend))
        images = pipe(**call).images
    if session is not None:
        for name, m in session.average_masks().items():
            masks[name] = [m[-len(seeds):][i].cpu().numpy() for i in range(len(seeds))]  # cond half
    return images, masks


def mask_overlay(image: Image.Image, mask: np.ndarray, color_index: int = 0) -> Image.Image:
    """The image with the concept's region tinted: where the residual acted."""
    color = np.array(MASK_COLORS[color_index % len(MASK_COLORS)], dtype=np.float32)
    m = Image.fromarray((mask * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    alpha = np.asarray(m, dtype=np.float32)[..., None] / 255 * 0.55
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + color * alpha).round().astype(np.uint8))
