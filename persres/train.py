"""Training personalized residuals (Ham et al., Sec. 3.2 and 4): a library function over TrainConfig.

Only the residual factors require grad. Everything frozen is computed once: the reference
images are encoded by the VAE a single time (the latent distribution's mean and std are
kept and a latent is sampled per step; horizontal flips and zoom-out views are extra cached
entries, a zoom-out view with a latent mask that keeps its loss on the image), and the
prompt "a photo of a {identifier} {class}" is encoded a single time (with the family's added
inputs, `Conditioning`). Each step is then one denoiser forward and backward, the floor
of what a trainer must do. Each model family supplies its objective (`persres.families`:
denoising on a UNet, flow matching on a diffusion transformer); the loop, the references'
views and the pack are shared.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import numpy as np
from diffusers.optimization import get_scheduler
from PIL import Image, ImageOps

from persres import families, residuals
from persres.config import TrainConfig
from persres.errors import InputError
from persres.conditioning import Conditioning, encode, text_encoders
from persres.families.denoising import denoising_loss, denoising_objective, noised, prediction_of, snr_weights  # noqa: F401  (train's objective on a UNet)
from persres.images import center_square, to_tensor
from persres.tokens import training_prompt

Progress = Callable[[int, float], None]  # (step, loss)


@dataclass(frozen=True)
class TrainResult:
    tensors: dict[str, torch.Tensor]  # "{block}.up" (m, r) and "{block}.down" (r, n)
    ranks: dict[str, int]
    parameter_count: int
    losses: list[float]
    seconds: float
    prompt: str
    resolution: int


@dataclass(frozen=True)
class Batch:
    latents: torch.Tensor  # (B, 4, h, w), normalized as the pipeline's VAE expects
    embedding: torch.Tensor  # (B, tokens, D)
    added: dict[str, torch.Tensor] | None  # the family's added inputs (`Conditioning.added`), batched
    mask: torch.Tensor | None  # (B, 1, h, w) where the loss counts; None: everywhere


@dataclass(frozen=True)
class CachedBatchSource:
    """Reference latents (mean, std) and the prompt's conditioning, computed once."""

    mean: torch.Tensor  # (N, 4, h, w)
    std: torch.Tensor  # (N, 4, h, w)
    condition: Conditioning
    scaling_factor: float | torch.Tensor  # a float, or per channel (C, 1, 1) (`Family.latent_normalization`)
    mask: torch.Tensor | None = None  # (N, 1, h, w) where the loss counts; None: everywhere
    shift_factor: float | torch.Tensor = 0.0  # subtracted before scaling (SD pipelines only scale)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        if self.mask is None:
            idx = torch.randint(0, self.mean.shape[0], (batch_size,), generator=generator, device=generator.device)
        else:  # half the draws are whole references, half zoom-out views
            full = self.mask.flatten(1).all(dim=1)  # (N,)
            weights = torch.where(full, 1.0 / full.sum(), 1.0 / (~full).sum().clamp_min(1)).to(generator.device)
            idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        eps = torch.randn(self.mean[idx].shape, generator=generator, device=generator.device)
        latents = (self.mean[idx] + self.std[idx] * eps - self.shift_factor) * self.scaling_factor  # (B, 4, h, w)
        embedding, added = self.condition.expand(batch_size)
        return Batch(latents, embedding, added, None if self.mask is None else self.mask[idx])


ZOOM_VIEWS = 4  # zoom-out views cached per reference (and per flipped reference); drawn half the time


def zoom_out_views(square: Image.Image, scale_min: float, cell: int, rng: random.Random) -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """ZOOM_VIEWS copies of `square`, each shrunk to a random scale in [scale_min, 1) and placed at
    a random position on a canvas of the same size whose outside repeats the image's edge pixels
    (Custom Diffusion's augmentation). Sizes and positions are multiples of `cell` (the VAE's
    scale factor), so each view's box (left, top, right, bottom), in latent cells, is exact."""
    side = square.size[0]
    cells = side // cell
    out = []
    for _ in range(ZOOM_VIEWS):
        n = max(1, min(cells - 1, round(rng.uniform(scale_min, 1.0) * cells)))  # the view's side, in cells
        x0, y0 = rng.randint(0, cells - n), rng.randint(0, cells - n)
        small = np.asarray(square.resize((n * cell, n * cell), Image.Resampling.BICUBIC).convert("RGB"))
        pad = ((y0 * cell, (cells - n - y0) * cell), (x0 * cell, (cells - n - x0) * cell), (0, 0))
        out.append((Image.fromarray(np.pad(small, pad, mode="edge")), (x0, y0, x0 + n, y0 + n)))
    return out


def default_resolution(pipe) -> int:
    return families.of(pipe).native_side(pipe)


def training_views(pipe, images: Sequence[Image.Image], resolution: int, flip: bool, scale_min: float = 1.0,
                   seed: int = 0, cell: int | None = None) -> tuple[list[Image.Image], torch.Tensor | None]:
    """The squares training draws from: the references, their mirror images if `flip`, and zoom-out
    views if `scale_min` < 1, with the latent-cell mask (N, 1, h, w) of where each holds the image
    (None without views). Views are placed on a grid of `cell` px (the VAE's scale factor, or the
    family's `view_cell`: twice it where latents are packed in 2x2 patches)."""
    device = families.denoiser(pipe).device
    squares = [center_square(im, resolution) for im in images]
    if flip:
        squares += [ImageOps.mirror(im) for im in squares]
    if scale_min >= 1.0:
        return squares, None
    cell = cell or pipe.vae_scale_factor
    views = [v for i, im in enumerate(squares) for v in zoom_out_views(im, scale_min, cell, random.Random(seed * 1_000_003 + i))]
    per_cell = cell // pipe.vae_scale_factor  # latent cells per grid cell
    cells = resolution // pipe.vae_scale_factor
    mask = torch.ones(len(squares) + len(views), 1, cells, cells, device=device)  # (N, 1, h, w)
    for k, (_, (x0, y0, x1, y1)) in enumerate(views, start=len(squares)):
        mask[k] = 0
        mask[k, :, y0 * per_cell:y1 * per_cell, x0 * per_cell:x1 * per_cell] = 1
    return squares + [im for im, _ in views], mask


@torch.no_grad()
def cache_inputs(pipe, images: Sequence[Image.Image], prompt: str, resolution: int, flip: bool, chunk: int = 4,
                 scale_min: float = 1.0, seed: int = 0) -> CachedBatchSource:
    family = families.of(pipe)
    squares, mask = training_views(pipe, images, resolution, flip, scale_min, seed, cell=family.view_cell(pipe))
    mean, std = encode_squares(pipe, squares, chunk)
    condition = encode(pipe, prompt, (resolution, resolution))
    shift, scale = family.latent_normalization(pipe)
    return CachedBatchSource(mean, std, condition, scale, mask, shift)


def objective_for(pipe, images, prompt: str, resolution: int, config: TrainConfig):
    """The family's training objective over inputs encoded once (denoising on a UNet, flow matching
    on a diffusion transformer)."""
    family = families.of(pipe)
    family.check_train_config(config)
    source = cache_inputs(pipe, images, prompt, resolution, config.flip, chunk=config.batch_size,
                          scale_min=config.scale_min, seed=config.seed)
    return family.objective(pipe, source, config)


def encode_squares(pipe, squares: Sequence[Image.Image], chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution (mean, std), each (N, 4, h, w) float32, of square images."""
    pixels = torch.stack([to_tensor(im) for im in squares]).to(pipe.vae.device, pipe.vae.dtype)  # (N, 3, H, W)
    family = families.of(pipe)
    dists = [family.latent_distribution(pipe, part) for part in pixels.split(chunk)]  # chunk: bounds the VAE's peak memory
    return torch.cat([mean for mean, _ in dists]).float(), torch.cat([std for _, std in dists]).float()


@torch.no_grad()
def encode_references(pipe, images: Sequence[Image.Image], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Center squares of the references through the VAE: (mean, std), each (N, 4, h, w)."""
    return encode_squares(pipe, [center_square(im, resolution) for im in images])


def train_residuals(
    pipe,
    images: Sequence[Image.Image],
    identifier: str,
    class_word: str,
    config: TrainConfig = TrainConfig(),
    progress: Progress | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Learn one concept's residuals on a loaded pipeline; the pipeline is left as it was.
    `on_phase(text)` hears when encoding the references ends and the steps begin."""
    family = families.of(pipe)
    unet = family.denoiser(pipe)  # a UNet or a diffusion transformer
    prompt = training_prompt(identifier, class_word, config.prompt)
    family.check_training_prompt(pipe, prompt, identifier, class_word)
    resolution = config.resolution or default_resolution(pipe)
    device = unet.device
    gen = torch.Generator(device=device).manual_seed(config.seed)
    if on_phase is not None:
        on_phase("encoding the references and the prompt, once")
    step_loss = objective_for(pipe, images, prompt, resolution, config)
    if on_phase is not None:
        on_phase("training")

    ranks = residuals.ranks_for(unet, config.rank_ratio, config.rank)
    # Only the factors learn: a pipeline handed in unfrozen would otherwise back-propagate into
    # every base weight. Restored on the way out, so the pipeline is left as it was.
    base_params = [p for part in (unet, pipe.vae, *text_encoders(pipe)) for p in part.parameters()]
    trainable = [p.requires_grad for p in base_params]
    for p in base_params:
        p.requires_grad_(False)
    slot = "_training"
    factors = residuals.new_concept(unet, slot, ranks, config.init, config.seed)
    params = [p for f in factors.values() for p in f.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # = Adam; the paper names no optimizer
    schedule = get_scheduler(config.lr_schedule, opt, num_warmup_steps=0, num_training_steps=config.steps)  # a LambdaLR
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    losses: list[float] = []
    t0 = time.perf_counter()
    # Only the new factors act while they learn: concepts already loaded on this pipeline (a
    # benchmark that trains several in one process) must not shape what this one learns.
    try:
        with residuals.use_concepts(unet, [slot], merged=False):
            for step in range(config.steps):
                loss = step_loss(gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if progress is not None:
                    progress(step + 1, losses[-1])
            tensors = residuals.concept_tensors(unet, slot)
    finally:
        residuals.unload_concept(unet, slot)
        for p, flag in zip(base_params, trainable):
            p.requires_grad_(flag)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
    seconds = time.perf_counter() - t0
    count = residuals.parameter_count(ranks, residuals.block_channels(unet), residuals.block_in_channels(unet))
    return TrainResult(tensors, ranks, count, losses, seconds, prompt, resolution)
