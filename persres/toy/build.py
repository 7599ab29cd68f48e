"""Train the toy text-to-image model that persres ships (SD v1.x structure, diffusers classes).

    python -m persres.toy.build --work ~/.cache/persres-toy --out persres/toy/model

Seeded and resumable: stage checkpoints live in --work and a rerun continues from the
newest one. Stages: VAE (scenes plus generic textures, latents centered by folding the
per-channel mean into quant_conv/post_quant_conv), then UNet and text encoder jointly
(min-SNR weighting, EMA, 10% caption dropout for classifier-free guidance).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from persres.tokens import RARE_IDENTIFIERS as IDENTIFIERS  # whole tokens, never in captions
from persres.toy import world

MAX_TOKENS = 32


# What `persres train` uses on this model unless told otherwise (see the README's toy section:
# measured with `persres bench toy --quick` against the paper's prompt and lr 1e-2).
# The toy captions never say "a photo of", so the paper's prompt puts untrained words
# around the identifier; "a sks circle" matches the captions' "a red circle".
RECOMMENDED_TRAIN = {"lr": 5e-3, "steps": 400, "prompt": "a {identifier} {class_word}"}


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in string.ascii_lowercase + string.digits:
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    for word in [*world.vocabulary(), *IDENTIFIERS]:
        parts = [*word[:-1], word[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            add(cur)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_components(vocab_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=world.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=96,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=96,
        attention_head_dim=4,  # SD v1.x semantics: number of heads
        norm_num_groups=32,
        use_linear_projection=False,
    )
    return vae, text_encoder, unet


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


def make_dataset(vae, tokenizer, n: int, work: Path, log):
    path = work / f"latents-{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    rng = random.Random(2)
    means, stds, ids = [], [], []
    with torch.no_grad():
        for start in range(0, n, 256):
            scenes = [world.random_scene(rng) for _ in range(min(256, n - start))]
            x = torch.stack([to_tensor(world.render(s)) for s in scenes]).to(vae.device)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.half().cpu())
            stds.append(dist.std.half().cpu())
            ids.append(tokenizer([s.caption() for s in scenes], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids)
            log(f"dataset {start + len(scenes)}/{n}")
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "ids": torch.cat(ids)}
    torch.save(data, path)
    return data


def train_unet(unet, text_encoder, vae, tokenizer, data, work: Path, steps: int, batch: int, log) -> dict:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    device = unet.device
    data = {k: v.to(device) for k, v in data.items()}
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    start = 0
    ckpts = sorted(work.glob("unet-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if ckpts:
        state = torch.load(ckpts[-1], weights_only=False, map_location=device)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["te"])
        opt.load_state_dict(state["opt"])
        ema, ema_te, start = state["ema"], state["ema_te"], state["step"]
        torch.set_rng_state(state["rng"].cpu())
        log(f"unet: resumed at step {start}")
    else:
        torch.manual_seed(3)
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids.to(device)
    alphas = sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    n = data["mean"].shape[0]
    sf = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(start, steps):
        idx = torch.randint(0, n, (batch,)).to(device)  # drawn on the CPU: one random stream whatever the device
        eps = torch.randn(batch, 4, world.SIZE // 2, world.SIZE // 2).to(device)
        lat = (data["mean"][idx].float() + data["std"][idx].float() * eps) * sf
        ids = data["ids"][idx].clone()
        drop = (torch.rand(batch) < 0.1).to(device)
        ids[drop] = empty
        noise = torch.randn(lat.shape).to(device)
        t = torch.randint(0, 1000, (batch,)).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        emb = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=emb).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
            for k, v in text_encoder.state_dict().items():
                ema_te[k].lerp_(v, 1 - decay) if v.dtype.is_floating_point else ema_te[k].copy_(v)
        if step % 50 == 0:
            log(f"unet step {step} loss {loss.item():.4f} {(step - start + 1) / (time.time() - t0):.2f} it/s")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            state = {"unet": unet.state_dict(), "te": text_encoder.state_dict(), "opt": opt.state_dict(),
                     "ema": ema, "ema_te": ema_te, "step": step + 1, "rng": torch.get_rng_state()}
            tmp = work / "tmp.pt"
            torch.save(state, tmp)
            tmp.replace(work / f"unet-{step + 1}.pt")
            for old in sorted(work.glob("unet-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
                old.unlink()
    return {"ema": ema, "ema_te": ema_te}


def export(out: Path, vae, text_encoder, unet, tokenizer, ema: dict, ema_te: dict, steps: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet.load_state_dict(ema)
    text_encoder.load_state_dict(ema_te)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out)
    # The model's own recommended training defaults (see README: "Model defaults").
    (out / "persres_defaults.json").write_text(json.dumps({"train": RECOMMENDED_TRAIN, "toy_steps": steps}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "persres-toy")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dataset", type=int, default=60000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (minutes on a GPU instead of hours)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    logf = (args.work / "log.txt").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    random.seed(0)
    tokenizer = build_tokenizer()
    device = torch.device(args.device)
    vae, text_encoder, unet = (m.to(device) for m in build_components(len(tokenizer)))
    t0 = time.time()
    train_vae(vae, args.work, args.vae_steps, 32, log, device)
    data = make_dataset(vae, tokenizer, args.dataset, args.work, log)
    ema = train_unet(unet, text_encoder, vae, tokenizer, data, args.work, args.steps, args.batch, log)
    export(args.out, vae, text_encoder, unet, tokenizer, ema["ema"], ema["ema_te"], args.steps)
    log(f"done in {time.time() - t0:.0f}s (this run); model in {args.out}")


if __name__ == "__main__":
    main()
