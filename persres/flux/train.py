"""Training residuals on FLUX.1: flow matching, as the pipeline samples.

The references' latents are encoded once, normalized as the pipeline's VAE expects
((z - shift) * scale) and packed in 2x2 patches as `FluxPipeline` packs them; the prompt's T5
states, pooled CLIP vector and text position ids are computed once (`encode`). Each step draws
σ ~ U(0, 1), shifts it as the pipeline's own scheduler shifts its sigmas for this image size
(`FlowMatchEulerDiscreteScheduler.time_shift` with μ from the image's token count, or its
static shift), and trains the transformer's velocity on

    x_σ = (1 - σ) x0 + σ ε,      target v = ε - x0,

at timestep σ with the guidance input the pipeline passes (FLUX.1-dev is guidance-distilled:
3.5, its default). One transformer forward and backward per step, as on the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from persres.conditioning import max_text_tokens
from persres.errors import InputError

TRAIN_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the value FLUX.1-dev LoRA trainers pass


@dataclass(frozen=True)
class FluxCondition:
    """A prompt's conditioning for the FLUX transformer, computed once."""

    prompt_embeds: torch.Tensor  # (1, T, D) T5 states
    pooled: torch.Tensor  # (1, P) CLIP's pooled vector
    text_ids: torch.Tensor  # (T, 3) position ids of the text tokens (zeros)


@torch.no_grad()
def encode(pipe, prompt: str) -> FluxCondition:
    dtype = pipe.transformer.dtype
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe.transformer.device,
                                                  num_images_per_prompt=1, max_sequence_length=max_text_tokens(pipe))
    return FluxCondition(embeds.to(dtype), pooled.to(dtype), text_ids)


def pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): the pipeline's 2x2 patches, row by row."""
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w) latent-cell mask -> (N, h/2 * w/2, 1): a patch counts where all its cells do."""
    return (F.avg_pool2d(mask, 2) == 1).float().flatten(1).unsqueeze(-1)


def image_ids(pipe, h: int, w: int, device) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed image tokens, as the pipeline makes them."""
    return pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)


def image_shift(scheduler, tokens: int) -> float | None:
    """μ of the scheduler's resolution-dependent shift for `tokens` image tokens (the pipeline's
    `calculate_shift`), or None where the scheduler shifts by a fixed amount."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    if not c.get("use_dynamic_shifting", False):
        return None
    return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def shifted_sigmas(scheduler, u: torch.Tensor, mu: float | None) -> torch.Tensor:
    """σ from uniform draws `u`, shifted as the scheduler shifts its sampling sigmas."""
    if mu is not None:
        return scheduler.time_shift(mu, 1.0, u)
    shift = scheduler.config.get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


@dataclass(frozen=True)
class FlowSource:
    """Reference latents (mean, std of the VAE's distribution) and the prompt's conditioning."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor  # (N, C, h, w)
    condition: FluxCondition
    shift_factor: float
    scaling_factor: float
    mask: torch.Tensor | None = None  # (N, h/2 * w/2, 1) where the loss counts; None: everywhere

    def sample(self, pipe, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed normalized latents (B, L, 4C), their loss mask (B, L, 1) or None)."""
        if self.mask is None:
            idx = torch.randint(0, self.mean.shape[0], (batch_size,), generator=generator, device=generator.device)
        else:  # half the draws are whole references, half zoom-out views (as on the UNet)
            full = self.mask.flatten(1).all(dim=1)  # (N,)
            weights = torch.where(full, 1.0 / full.sum(), 1.0 / (~full).sum().clamp_min(1)).to(generator.device)
            idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        eps = torch.randn(self.mean[idx].shape, generator=generator, device=generator.device)
        latents = (self.mean[idx] + self.std[idx] * eps - self.shift_factor) * self.scaling_factor  # (B, C, h, w)
        return pack(pipe, latents), None if self.mask is None else self.mask[idx]


def cache_inputs(pipe, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor | None, prompt: str) -> FlowSource:
    """The references' latent distribution (mean, std: (N, C, h, w), encoded once by the caller) with
    its loss mask, and the prompt through both encoders once."""
    h, w = mean.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"FLUX packs latents in 2x2 patches: the training resolution must be a multiple of "
                         f"{2 * pipe.vae_scale_factor} px")
    vae = pipe.vae.config
    return FlowSource(mean, std, encode(pipe, prompt), vae.get("shift_factor") or 0.0, vae.scaling_factor,
                      None if mask is None else pack_mask(mask))


def flow_matching_objective(pipe, source: FlowSource, batch_size: int):
    """`loss(generator)`: one batch's flow-matching loss (a closure over everything computed once)."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    device, dtype = transformer.device, transformer.dtype
    h, w = source.mean.shape[-2:]
    ids = image_ids(pipe, h, w, device)
    mu = image_shift(scheduler, (h // 2) * (w // 2))
    cond = source.condition
    embeds, pooled = cond.prompt_embeds.expand(batch_size, -1, -1), cond.pooled.expand(batch_size, -1)
    guidance = torch.full((batch_size,), TRAIN_GUIDANCE, device=device) if transformer.config.guidance_embeds else None

    def loss(generator: torch.Generator) -> torch.Tensor:
        x0, mask = source.sample(pipe, batch_size, generator)  # (B, L, 4C)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        u = torch.rand((batch_size,), generator=generator, device=device)
        sigma = shifted_sigmas(scheduler, u, mu).view(-1, 1, 1)  # (B, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        pred = transformer(hidden_states=noisy.to(dtype), timestep=sigma.flatten().to(dtype), guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=cond.text_ids, img_ids=ids,
                           return_dict=False)[0]
        err = (pred.float() - (noise - x0)) ** 2  # (B, L, 4C)
        return err.mean() if mask is None else (err * mask).sum() / (mask.sum() * err.shape[-1])

    return loss
