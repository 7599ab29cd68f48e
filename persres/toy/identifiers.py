"""Teach a toy model more identifiers: extend its tokenizer to every one of `IDENTIFIERS` and
train only the new tokens' embeddings, as meaningless fillers, the way the build trains them.

    python -m persres.toy.identifiers --model persres/toy/model --work ~/.cache/persres-toy-ids

Every weight the model had stays as it was (its UNet, its text encoder, the embedding rows of
its existing tokens) and every existing token keeps its id, so a caption without a new
identifier encodes and draws exactly as before. A new row starts in the spread of the existing
identifiers' rows (their mean plus a random mix of their deviations) and is then fitted with
the build's objective (min-SNR-5 denoising on rendered scenes, captions from
`build.training_caption` with one new identifier as a filler per caption), the UNet and the
rest of the text encoder frozen. Seeded and resumable (checkpoints in --work).
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from persres.toy import world
from persres.tokens import is_single_token
from persres.toy.build import decode_scene, latest_checkpoint, make_dataset, save_checkpoint, training_caption, work_log
from persres.toy.vocabulary import IDENTIFIERS, MAX_TOKENS, build_tokenizer


def extend(model: Path, log):
    """The model's components (fp32), its tokenizer extended to all IDENTIFIERS, and the ids of
    the new identifier tokens; new embedding rows drawn in the spread of the existing identifiers'."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    old_tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    tokenizer = build_tokenizer(old_tok)
    old_vocab = old_tok.get_vocab()
    if any(tokenizer.get_vocab()[t] != i for t, i in old_vocab.items()):
        raise RuntimeError("extending the tokenizer moved an existing token")
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder", dtype=torch.float32)

    def token_id(word: str) -> int:
        return tokenizer(word, add_special_tokens=False).input_ids[0]  # old ids are unchanged: one id in both

    known = [token_id(w) for w in IDENTIFIERS if is_single_token(old_tok, w)]
    new = [token_id(w) for w in IDENTIFIERS if not is_single_token(old_tok, w)]
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        rows = emb[known]  # (K, D): the identifiers the model was trained with
        mean, spread = rows.mean(0), rows - rows.mean(0)
        g = torch.Generator().manual_seed(0)
        mix = torch.randn(len(new), len(known), generator=g) / len(known) ** 0.5  # (N, K)
        emb[new] = mean + mix @ spread
    log(f"tokenizer: {len(old_vocab)} -> {len(tokenizer)} tokens, {len(known)} known and {len(new)} new identifiers")
    return tokenizer, vae, text_encoder, unet, new


def fit_new_rows(unet, text_encoder, vae, tokenizer, new_ids: list[int], data, work: Path, steps: int, batch: int,
                 log, lr: float = 2e-3) -> None:
    """Fit the embedding rows `new_ids` with the build's denoising objective, all else frozen."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    emb = text_encoder.get_input_embeddings().weight
    fixed = torch.ones(emb.shape[0], 1, dtype=torch.bool)
    fixed[new_ids] = False
    emb.requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)  # no weight decay: rows with zero gradient never move
    fillers = tuple(tokenizer.decode([i]).strip() for i in new_ids)
    scenes = data["scenes"].tolist()
    mean, std = data["mean"], data["std"]
    caption_rng, start = random.Random(7), 0
    ckpt = latest_checkpoint(work, "ids")
    if ckpt is not None:
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            emb.copy_(state["emb"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        caption_rng.setstate(state["caption_rng"])
        start = state["step"]
        log(f"identifiers: resumed at step {start}")
    else:
        torch.manual_seed(8)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    sf = vae.config.scaling_factor
    t0 = time.time()
    for step in range(start, steps):
        idx = torch.randint(0, len(scenes), (batch,))
        lat = (mean[idx].float() + std[idx].float() * torch.randn(batch, 4, world.SIZE // 2, world.SIZE // 2)) * sf
        # every object carries a new identifier: each step teaches about 1.3 x batch of them
        captions = [training_caption(decode_scene(scenes[i]), caption_rng, fillers=fillers, filler=1.0)
                    for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        noise = torch.randn(lat.shape)
        t = torch.randint(0, 1000, (batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * lat + (1 - a).sqrt() * noise, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        emb.grad.masked_fill_(fixed, 0.0)
        opt.step()
        if step % 25 == 0:
            log(f"identifiers step {step} loss {loss.item():.4f} {(step - start + 1) / (time.time() - t0):.2f} it/s")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            state = {"emb": emb.detach().clone(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                     "caption_rng": caption_rng.getstate(), "step": step + 1}
            save_checkpoint(work, "ids", step + 1, state)
    emb.requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    from persres.models import TOY_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=TOY_DIR)
    ap.add_argument("--out", type=Path, help="where the extended model goes (default: --model itself)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "persres-toy-ids")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dataset", type=int, default=8192)
    ap.add_argument("--unnamed", type=float, default=0.4)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log = work_log(args.work)
    tokenizer, vae, text_encoder, unet, new_ids = extend(args.model, log)
    if not new_ids:
        log("every identifier is already a token of this model")
        return
    data = make_dataset(vae, args.dataset, args.work, log, unnamed=args.unnamed)
    fit_new_rows(unet, text_encoder, vae, tokenizer, new_ids, data, args.work, args.steps, args.batch, log)
    out = args.out or args.model
    if out != args.model:
        shutil.copytree(args.model, out, dirs_exist_ok=True)
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    log(f"{len(new_ids)} identifiers added; model in {out}")


if __name__ == "__main__":
    main()
