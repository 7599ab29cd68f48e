"""The toy model's VAE: trained on toy scenes and generic images, its latents centered for the UNet."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from persres.toy import world


def generic_image(rng: random.Random) -> torch.Tensor:
    """Random flat colors, checkers and stripes, so textures are representable by the VAE."""
    a = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    b = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0 : world.SIZE, 0 : world.SIZE]
    kind = rng.randrange(4)
    cell = rng.choice((2, 3, 4, 6))
    if kind == 0:
        on = np.zeros_like(xx, dtype=bool)
    elif kind == 1:
        on = ((xx // cell + yy // cell) % 2) == 0
    elif kind == 2:
        on = ((yy if rng.random() < 0.5 else xx) // cell) % 2 == 0
    else:
        on = xx < rng.randrange(4, world.SIZE - 4)
    img = np.where(on[..., None], a, b)
    return torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1


def to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def train_vae(vae, work: Path, steps: int, batch: int, log, device: torch.device = torch.device("cpu")) -> None:
    ckpt = work / "vae.pt"
    if ckpt.exists():
        vae.load_state_dict(torch.load(ckpt, weights_only=True, map_location=device))
        log(f"vae: loaded {ckpt}")
        return
    rng = random.Random(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        xs = [generic_image(rng) if rng.random() < 0.3 else to_tensor(world.render(world.random_scene(rng))) for _ in range(batch)]
        x = torch.stack(xs).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    center_latents(vae, rng)
    torch.save(vae.state_dict(), ckpt)


@torch.no_grad()
def center_latents(vae, rng: random.Random) -> None:
    """Fold the latent per-channel mean into the biases and set scaling_factor = 1/std."""
    x = torch.stack([to_tensor(world.render(world.random_scene(rng))) for _ in range(512)]).to(vae.device)
    z = vae.encode(x).latent_dist.mean  # (N, 4, h, w)
    mu = z.mean(dim=(0, 2, 3))  # (4,)
    vae.quant_conv.bias[:4] -= mu
    w = vae.post_quant_conv.weight[:, :, 0, 0]  # (4, 4)
    vae.post_quant_conv.bias += w @ mu
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
