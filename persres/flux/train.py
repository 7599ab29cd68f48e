"""Training residuals on FLUX.1: flow matching, as the pipeline samples.

The references' latents and the prompt's conditioning (T5 states, CLIP's pooled vector) are
computed once by `persres.train.cache_inputs`, as for every family; latents are normalized as
FLUX's VAE expects ((z - shift) * scale) and packed here in 2x2 patches as `FluxPipeline`
packs them. Each step draws σ ~ U(0, 1), shifts it as the pipeline's own scheduler shifts its
sigmas for this image size (`FlowMatchEulerDiscreteScheduler.time_shift` with μ from the
image's token count, or its static shift), and trains the transformer's velocity on

    x_σ = (1 - σ) x0 + σ ε,      target v = ε - x0,

at timestep σ with the guidance input the pipeline passes (FLUX.1-dev is guidance-distilled:
3.5, its default). One transformer forward and backward per step, as on the UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from persres.errors import InputError

TRAIN_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the value FLUX.1-dev LoRA trainers pass


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


def flow_matching_objective(pipe, source, batch_size: int):
    """`loss(generator)`: one batch's flow-matching loss over `source` (a `persres.train.CachedBatchSource`
    of this pipeline: everything computed once)."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    device, dtype = transformer.device, transformer.dtype
    h, w = source.mean.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"FLUX packs latents in 2x2 patches: the training resolution must be a multiple of "
                         f"{2 * pipe.vae_scale_factor} px")
    ids = image_ids(pipe, h, w, device)
    text_ids = torch.zeros(source.condition.embedding.shape[1], 3, device=device)  # (T, 3): text tokens sit at 0, as the pipeline's
    mu = image_shift(scheduler, (h // 2) * (w // 2))
    guidance = torch.full((batch_size,), TRAIN_GUIDANCE, device=device) if transformer.config.guidance_embeds else None

    def loss(generator: torch.Generator) -> torch.Tensor:
        batch = source.sample(batch_size, generator)
        x0 = pack(pipe, batch.latents)  # (B, L, 4C)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        u = torch.rand((batch_size,), generator=generator, device=device)
        sigma = shifted_sigmas(scheduler, u, mu).view(-1, 1, 1)  # (B, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        pred = transformer(hidden_states=noisy.to(dtype), timestep=sigma.flatten().to(dtype), guidance=guidance,
                           pooled_projections=batch.added["pooled_projections"], encoder_hidden_states=batch.embedding,
                           txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        err = (pred.float() - (noise - x0)) ** 2  # (B, L, 4C)
        if batch.mask is None:
            return err.mean()
        mask = pack_mask(batch.mask)  # (B, L, 1)
        return (err * mask).sum() / (mask.sum() * err.shape[-1])

    return loss
