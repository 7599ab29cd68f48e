"""The DDPM denoising objective a UNet family trains on (Ham et al., Sec. 3.2: the diffusion loss):
the forward process at uniform timesteps, the model's target (ε or v), optional min-SNR-γ weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from persres.errors import InputError


def prediction_of(scheduler) -> str:
    """What the model predicts: epsilon or v_prediction; a model of any other kind is refused."""
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):  # "sample" (x0) models: no SD release uses them
        raise InputError(f"the model's scheduler predicts {prediction!r}; persres trains epsilon and v_prediction models only")
    return prediction


def noised(alphas: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str):
    """(x_t, the model's target): the forward process at timesteps t (B,), and epsilon or v."""
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # (B, 4, h, w)
    return noisy, noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents


def snr_weights(alphas: torch.Tensor, t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) at timesteps t (B,): the loss of a noisy step
    counts as it does in plain MSE, that of a step with SNR above γ is scaled down to γ/SNR of
    its x0 error; for v-prediction the target already carries a factor SNR + 1."""
    snr = alphas[t] / (1 - alphas[t])  # (B,)
    return torch.clamp(snr, max=gamma) / (snr if prediction == "epsilon" else snr + 1)


def denoising_loss(unet, batch, noise: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor, prediction: str,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """The training objective on one batch: the UNet's prediction against its target (noise or v),
    min-SNR-γ weighted if asked, averaged over the image's cells (only where a mask says which)."""
    noisy, target = noised(alphas, batch.latents, noise, t, prediction)
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=batch.embedding, added_cond_kwargs=batch.added).sample
    if batch.mask is None and snr_gamma is None:
        return F.mse_loss(pred.float(), target)
    err = (pred.float() - target) ** 2  # (B, 4, h, w)
    if snr_gamma is not None:
        err = err * snr_weights(alphas, t, prediction, snr_gamma).view(-1, 1, 1, 1)
    return err.mean() if batch.mask is None else (err * batch.mask).sum() / (batch.mask.sum() * pred.shape[1])


def denoising_objective(unet, source, batch_size: int, scheduler, snr_gamma: float | None):
    """`loss(generator)`: one batch's denoising loss on a UNet (a closure over what is computed once)."""
    prediction = prediction_of(scheduler)
    alphas = scheduler.alphas_cumprod.to(unet.device)
    num_t = scheduler.config.num_train_timesteps

    def loss(generator: torch.Generator) -> torch.Tensor:
        batch = source.sample(batch_size, generator)
        noise = torch.randn(batch.latents.shape, generator=generator, device=generator.device)
        t = torch.randint(0, num_t, (batch_size,), generator=generator, device=generator.device)
        return denoising_loss(unet, batch, noise, t, alphas, prediction, snr_gamma)

    return loss
