"""Train the toy text-to-image model that persres ships (SD v1.x structure, diffusers classes).

    python -m persres.toy.build --work ~/.cache/persres-toy --out persres/toy/model

Seeded and resumable: stage checkpoints live in --work and a rerun continues from the
newest one. Stages: VAE (scenes plus generic textures, latents centered by folding the
per-channel mean into quant_conv/post_quant_conv), then UNet and text encoder jointly
(min-SNR weighting, EMA, 10% caption dropout for classifier-free guidance).

The text side is made to behave like Stable Diffusion's: captions vary in framing ("a photo
of a red circle ..."), leave out the color or the background at times, and now and then
carry a rare identifier as a meaningless filler ("a sks red circle ..." draws the same
picture), so identifiers are in-distribution tokens with weak meaning, as `sks` is in SD.
Every word and identifier is one token.

`--init-from DIR` starts from an exported model instead of from scratch (its VAE is kept
and its tokenizer extended, existing token ids unchanged): the shipped model is such a
fine-tune, in three stages (docs/toy-world.md).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from persres.settings import DEFAULTS_FILE
from persres.residuals import transformer_blocks
from persres.toy import world
from persres.toy.grow import grow_unet
from persres.toy.vae import to_tensor, train_vae  # noqa: F401  (to_tensor: re-exported)
from persres.toy.vocabulary import IDENTIFIERS, MAX_TOKENS, build_tokenizer  # noqa: F401  (build_tokenizer: re-exported)

CAPTION = {  # probabilities of the caption variations
    "photo": 0.3,  # "a photo of " in front
    "no_color": 0.2,  # "a circle" instead of "a red circle" (all objects)
    "no_background": 0.2,  # no " on a ... background"
    "filler": 0.1,  # per object: an identifier before or after the color
}


# What `persres train` uses on this model unless told otherwise (docs/toy-world.md, "Studied",
# decided on the tuning concepts with benchmarks/toy_seeds.py, 20 packs).
# "a sks circle" matches the captions' "a red circle". 800 steps, not 400: +0.03 identity in new
# scenes. Rank ratio 1.0 (factors as wide as the layer: ranks 64 and 128) at lr 1e-3: +0.08
# identity in new scenes over the paper's 0.05 at lr 5e-3, pairs with LAG +0.08 / +0.03 own - other;
# rank and lr go together (rank 1.0 at lr 5e-3 lost 0.09). SD's own default stays the paper's 0.05.
# 1200 steps with a cosine decay and min-SNR-5 loss weights: together +0.06 / +0.04 (LAG) over 800
# constant-lr plain-MSE steps (10 packs; each alone +0.02 to +0.04, inside its interval).
RECOMMENDED_TRAIN = {"lr": 1e-3, "steps": 1200, "lr_schedule": "cosine", "snr_gamma": 5.0, "rank_ratio": 1.0,
                     "prompt": "a {identifier} {class_word}"}


def training_caption(scene: world.Scene, rng: random.Random, fillers: tuple[str, ...] = IDENTIFIERS,
                     filler: float = CAPTION["filler"]) -> str:
    """One of the caption variations of `scene` (see CAPTION): each object carries one of
    `fillers` with probability `filler`."""
    no_color = rng.random() < CAPTION["no_color"]
    phrases = []
    for o in scene.objects:
        words = [o.shape] if no_color or o.color == world.UNNAMED else [o.color, o.shape]
        if rng.random() < filler:
            words.insert(rng.randrange(len(words)), rng.choice(fillers))
        phrases.append("a " + " ".join(words))
    text = " and ".join(phrases)
    if rng.random() >= CAPTION["no_background"]:
        text += f" on a {scene.background} background"
    if rng.random() < CAPTION["photo"]:
        text = "a photo of " + text
    return text


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


SCENE_FIELDS = 5  # background, then (color, shape) of up to two objects; -1 where absent
UNNAMED_INDEX = len(world.COLORS)  # the color field of an object with an unnamed appearance


def encode_scenes(scenes: list[world.Scene]) -> torch.Tensor:
    rows = []
    for s in scenes:
        row = [world.COLORS.index(s.background)]
        for o in s.objects:
            color = UNNAMED_INDEX if o.color == world.UNNAMED else world.COLORS.index(o.color)
            row += [color, world.SHAPES.index(o.shape)]
        rows.append(row + [-1] * (SCENE_FIELDS - len(row)))
    return torch.tensor(rows, dtype=torch.int16)  # (N, 5)


def decode_scene(row: list[int]) -> world.Scene:
    color = lambda i: world.UNNAMED if i == UNNAMED_INDEX else world.COLORS[i]
    objs = tuple(world.Obj(world.SHAPES[row[i + 1]], color(row[i]), 0, 0, 0) for i in (1, 3) if row[i] >= 0)
    return world.Scene(world.COLORS[row[0]], objs)


def make_dataset(vae, n: int, work: Path, log, two_prob: float = 0.3, unnamed: float = 0.0):
    """Latent mean/std of n random scenes and the scenes themselves (captions are drawn per step)."""
    path = work / (f"latents-v2-{n}.pt" if not unnamed else f"latents-v3-u{round(unnamed * 100)}-{n}.pt")
    if path.exists():
        return torch.load(path, weights_only=True)
    rng = random.Random(2 if not unnamed else 5)
    means, stds, rows = [], [], []
    with torch.no_grad():
        for start in range(0, n, 256):
            scenes = [world.random_scene(rng, two_prob=two_prob, unnamed=unnamed) for _ in range(min(256, n - start))]
            x = torch.stack([to_tensor(world.render(s)) for s in scenes]).to(vae.device)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.half().cpu())
            stds.append(dist.std.half().cpu())
            rows.append(encode_scenes(scenes))
            log(f"dataset {start + len(scenes)}/{n}")
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "scenes": torch.cat(rows)}
    torch.save(data, path)
    return data


def work_log(work: Path):
    """A `log(msg)` printing timestamped lines and appending them to `work`/log.txt."""
    logf = (work / "log.txt").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    return log


def _checkpoints(work: Path, prefix: str) -> list[Path]:
    return sorted(work.glob(f"{prefix}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def latest_checkpoint(work: Path, prefix: str) -> Path | None:
    """The newest `prefix`-STEP.pt in `work`, if any (what a rerun resumes from)."""
    found = _checkpoints(work, prefix)
    return found[-1] if found else None


def save_checkpoint(work: Path, prefix: str, step: int, state: dict, keep: int = 2) -> None:
    """Write `prefix`-STEP.pt atomically and keep only the newest `keep` of them."""
    tmp = work / "tmp.pt"
    torch.save(state, tmp)
    tmp.replace(work / f"{prefix}-{step}.pt")
    for old in _checkpoints(work, prefix)[:-keep]:
        old.unlink()


def train_unet(unet, text_encoder, vae, tokenizer, data, work: Path, steps: int, batch: int, log, lr: float = 5e-4,
               warmup: int = 200) -> dict:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    device = unet.device
    scenes = data.pop("scenes").tolist()
    data = {k: v.to(device) for k, v in data.items()}
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    start = 0
    caption_rng = random.Random(4)
    ckpt = latest_checkpoint(work, "unet")
    if ckpt is not None:
        state = torch.load(ckpt, weights_only=False, map_location=device)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["te"])
        opt.load_state_dict(state["opt"])
        sched_lr.load_state_dict(state["sched"])
        ema, ema_te, start = state["ema"], state["ema_te"], state["step"]
        torch.set_rng_state(state["rng"].cpu())
        caption_rng.setstate(state["caption_rng"])
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
        captions = [training_caption(decode_scene(scenes[i]), caption_rng) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids.to(device)
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
        sched_lr.step()
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
                     "ema": ema, "ema_te": ema_te, "step": step + 1, "rng": torch.get_rng_state(),
                     "sched": sched_lr.state_dict(), "caption_rng": caption_rng.getstate()}
            save_checkpoint(work, "unet", step + 1, state)
    return {"ema": ema, "ema_te": ema_te}


def export(out: Path, vae, text_encoder, unet, tokenizer, ema: dict, ema_te: dict, record: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet.load_state_dict(ema)
    text_encoder.load_state_dict(ema_te)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # UNet and VAE are stored in fp16 (a grown UNet is 31 MB in fp32; the model stays under 30 MB),
    # the text encoder in fp32: a plain `StableDiffusionPipeline.from_pretrained(dir)` loads diffusers
    # models in fp32 whatever their stored dtype but a transformers model in its stored dtype, and an
    # fp16 text encoder beside an fp32 UNet fails. With torch_dtype every component takes that dtype.
    pipe.to(torch.float32)
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(out)
    # The model's own recommended training defaults (see README: "Model defaults").
    (out / "persres_defaults.json").write_text(
        json.dumps({"train": RECOMMENDED_TRAIN, "class_candidates": list(world.SHAPES), **record}, indent=2) + "\n")


def load_init(init: Path, log):
    """Components of an exported model (fp32), its tokenizer extended to one token per word.

    A word the old tokenizer split gets its new token's embedding from the mean of its old pieces'.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    old_tok = CLIPTokenizer.from_pretrained(init / "tokenizer")
    tokenizer = build_tokenizer(old_tok)
    vae = AutoencoderKL.from_pretrained(init / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder", dtype=torch.float32)
    old_emb = text_encoder.get_input_embeddings().weight.detach().clone()  # (V_old, D)
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for word in [*world.vocabulary(), *IDENTIFIERS]:
            pieces = old_tok(word, add_special_tokens=False).input_ids
            new_id = tokenizer(word, add_special_tokens=False).input_ids[0]
            if len(pieces) > 1 or new_id >= len(old_emb):
                emb[new_id] = old_emb[pieces].mean(0)
                log(f"init: {word!r} -> token {new_id} from {len(pieces)} old pieces")
    return tokenizer, vae, text_encoder, unet


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
    ap.add_argument("--init-from", type=Path, help="an exported toy model to fine-tune instead of training from scratch")
    ap.add_argument("--grow-layers", type=lambda v: [int(x) for x in v.split(",")], metavar="N,N,N",
                    help="layers per down block to grow the UNet to, every new layer starting as an identity "
                         "(persres.toy.grow); with --init-from, a fine-tune then trains them")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--unnamed", type=float, default=0.0,
                    help="share of objects with an appearance no caption names (random patterns and colors)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = work_log(args.work)
    random.seed(0)
    device = torch.device(args.device)
    record: dict = {"toy_steps": args.steps}
    if args.init_from:
        tokenizer, vae, text_encoder, unet = load_init(args.init_from, log)
        init_record = json.loads((args.init_from / DEFAULTS_FILE).read_text()) if (args.init_from / DEFAULTS_FILE).is_file() else {}
        record = {"fine_tuned_from": {k: v for k, v in init_record.items() if k != "train"}, "fine_tune_steps": args.steps}
    else:
        tokenizer = build_tokenizer()
        vae, text_encoder, unet = build_components(len(tokenizer))
    if args.grow_layers:
        torch.manual_seed(0)  # the new layers' weights that do not start at zero
        unet = grow_unet(unet, args.grow_layers)
        record["grown_to_layers_per_block"] = args.grow_layers
        log(f"unet grown to layers_per_block {args.grow_layers}: {len(transformer_blocks(unet))} transformer blocks")
    if args.unnamed:
        record["unnamed_appearances"] = args.unnamed
    vae, text_encoder, unet = vae.to(device), text_encoder.to(device), unet.to(device)
    t0 = time.time()
    if not args.init_from:
        train_vae(vae, args.work, args.vae_steps, 32, log, device)
    data = make_dataset(vae, args.dataset, args.work, log, unnamed=args.unnamed)
    ema = train_unet(unet, text_encoder, vae, tokenizer, data, args.work, args.steps, args.batch, log, lr=args.lr)
    export(args.out, vae, text_encoder, unet, tokenizer, ema["ema"], ema["ema_te"], record)
    log(f"done in {time.time() - t0:.0f}s (this run); model in {args.out}")


if __name__ == "__main__":
    main()
