"""Sampling with personalized residuals, with or without LAG, for one or several concepts.

Without LAG the residuals of the prompt's concepts are folded into the proj_out weights for
the call (`use_concepts(merged=True)`), so a personalized model samples at the base model's
speed. With LAG they stay unmerged and act only in their concepts' regions, found from the
cross-attention of the same UNet evaluation (`persres.lag`). Each image i of a call uses
seed + i, so `-n 1 --seed S` reproduces any one of them from its PNG metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from persres import families, layers, residuals
from persres.config import SampleConfig
from persres.errors import GenerationError, InputError, PromptError
from persres.lag import ConceptTokens, lag_regions
from persres.tokens import BoundConcept, concept_span

@dataclass
class Generated:
    images: list[Image.Image]
    seeds: list[int]
    prompt: str  # expanded: identifiers in place of placeholders
    masks: dict[str, list[np.ndarray]] = field(default_factory=dict)  # concept -> per image (h, w) in [0, 1]
    paths: list[Path] = field(default_factory=list)  # the files written for this call, if any (`generation.write_images`)
    image_paths: list[Path] = field(default_factory=list)  # of those, the images themselves (one per seed)


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
    family = families.of(pipe)
    tokens = concept_tokens(family.region_tokenizer(pipe), prompt, [c for c in concepts if not c.everywhere])
    if concepts:  # positions are read off one tokenizer: they must hold for every encoder
        family.check_concept_prompt(pipe, prompt)
    limit = pipe.scheduler.config.get("num_train_timesteps", 1000)
    if config.steps > limit:
        raise InputError(f"--steps must be <= {limit} (the scheduler's training timesteps), got {config.steps}")
    height = config.height or family.native_side(pipe)
    width = config.width or family.native_side(pipe)
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
    family = families.of(pipe)
    model = family.denoiser(pipe)
    device = model.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    call = dict(
        prompt=prompt, num_inference_steps=config.steps, guidance_scale=config.guidance,
        num_images_per_prompt=len(seeds), generator=generators, height=height, width=width,
        output_type="np",  # (N, H, W, 3) in [0, 1]: checked finite before it becomes pixels
    )
    call.update(family.sampling_arguments(pipe, config))
    if callback is not None:
        call["callback_on_step_end"] = callback
    names = [c.name for c in concepts]
    masks: dict[str, list[np.ndarray]] = {}
    session = None
    changed = torch.nn.ModuleList(layers.components(pipe).values())  # the denoiser and the text encoders
    with ExitStack() as stack:
        if residuals.all_layers(changed):  # loaded concepts the prompt does not name stay off
            strengths = {c.name: c.strength for c in concepts}
            stack.enter_context(residuals.use_concepts(changed, names, merged=not config.lag, strengths=strengths))
        if config.lag:
            cell = family.view_cell(pipe)  # pixels per position the denoiser sees
            latent_hw = (height // cell, width // cell)
            stack.enter_context(layers.OwnTokenEncodings(pipe, tokens, prompt))
            session = stack.enter_context(lag_regions(model, tokens, family=family, guided=family.guidance_in_batch(config.guidance),
                                                      backend=backend, latent_hw=latent_hw, keep_masks=config.save_masks,
                                                      multi=config.multi, steps=config.steps,
                                                      everywhere=[c.name for c in concepts if c.everywhere]))
        else:
            stack.enter_context(family.plain_attention(model, backend))
        pixels = pipe(**call).images
    if not np.isfinite(pixels).all():  # NaN would be written as black with nothing said
        made_by = f"with concept(s) {', '.join(repr(n) for n in names)}: a residual is damaged or far too strong" if names \
            else "by the base model alone (try --precision fp32)"
        raise GenerationError(f"the images came out non-finite (NaN or inf) {made_by}; nothing was written")
    images = pipe.image_processor.numpy_to_pil(pixels)
    if session is not None:
        for name, m in session.average_masks().items():
            masks[name] = [m[-len(seeds):][i].cpu().numpy() for i in range(len(seeds))]  # cond half
    return images, masks
