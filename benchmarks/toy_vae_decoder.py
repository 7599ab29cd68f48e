"""Is the toy VAE's color loss in its decoder? Fine-tune the decoder alone (the encoder and so
the UNet's latents stay as shipped) on scenes in colors from all of RGB, and score the
references' round trip with the toy bench's Lab measure on the tuning sets as it trains.

    python -m benchmarks.toy_vae_decoder --steps 2000 --json benchmarks/results/toy-vae-decoder.json

Training images: 30% generic flat/checker/stripe images in random colors, 40% scenes whose
objects all have unnamed appearances (`world.random_pattern`: the training pattern families
in random colors), 30% ordinary training scenes; L1 + MSE on the decoded latent mean.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def round_trip_delta_e(vae, sets: tuple[str, ...]) -> dict[str, float]:
    """Per set: the mean over concepts of the median object ΔE76 of the references' round trip."""
    from persres.images import read_folder, to_pil
    from persres.toy import CONCEPTS_DIR, world
    from persres.toy.bench import object_pixels
    from persres.toy.scoring import color_fidelity, reference_lab
    from persres.toy.vae import to_tensor

    out = {}
    for s in sets:
        per_concept = []
        for name in world.CONCEPT_SETS[s]:
            refs = [r.image.convert("RGB") for r in read_folder(CONCEPTS_DIR / name)]
            lab = reference_lab(object_pixels(refs))
            with torch.no_grad():
                rec = vae.decode(vae.encode(torch.stack([to_tensor(im) for im in refs])).latent_dist.mean).sample
            scores = [f for f in (color_fidelity(to_pil(r), lab) for r in rec) if f]
            per_concept.append(statistics.median(f["delta_e"] for f in scores))
        out[s] = round(statistics.mean(per_concept), 2)
    return out


def training_batch(rng: random.Random, n: int) -> torch.Tensor:
    from persres.toy import world
    from persres.toy.vae import generic_image, to_tensor

    xs = []
    for _ in range(n):
        u = rng.random()
        if u < 0.3:
            xs.append(generic_image(rng))
        else:
            xs.append(to_tensor(world.render(world.random_scene(rng, unnamed=1.0 if u < 0.7 else 0.4))))
    return torch.stack(xs)  # (n, 3, 32, 32) in [-1, 1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--every", type=int, default=1000, help="score the round trip every this many steps")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    from persres.models import TOY_DIR

    torch.manual_seed(0)
    tuning = ("tuning", "tuning_2")
    vae = AutoencoderKL.from_pretrained(TOY_DIR / "vae", torch_dtype=torch.float32)
    trace = [{"step": 0, "delta_e": round_trip_delta_e(vae, tuning)}]
    print(trace[-1], flush=True)
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng, start = random.Random(5), time.perf_counter()
    for step in range(1, args.steps + 1):
        x = training_batch(rng, args.batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            trace.append({"step": step, "delta_e": round_trip_delta_e(vae, tuning), "seconds": round(time.perf_counter() - start, 1)})
            print(trace[-1], flush=True)
    report = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "tuning_round_trip": trace}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
