"""How far identity on the toy world can go: what the metric gives a perfect copy, and what the
toy model gives when every UNet weight may move, against the residuals' lift.

    OMP_NUM_THREADS=1 python -m benchmarks.toy_ceiling run --out benchmarks/results/toy-ceiling
    python -m benchmarks.toy_ceiling report --out benchmarks/results/toy-ceiling --against benchmarks/results/toy-seeds/VARIANT

Per concept of the tuning sets (`--sets held_out` only to report):
- ceiling: each reference, through the model's VAE, scored against the other references'
  histogram (leave one out): the identity of a picture that *is* the concept, in one of its
  own scenes. A lift target above (ceiling - base) asks for more than a copy.
- full fine-tuning: the whole UNet trained on the same cached latents, prompt, flips, batch
  and steps as a residual pack (the toy defaults), Adam at `--lr`; then the change-background
  prompts of `persres bench toy` (same texts, seeds and sampler) scored like the bench,
  paired against the base model. Not the method: a bound on what any weight change of
  this UNet reaches with this data, to tell a limit of the residuals from one of the model.
`report` sets both beside the residual packs of a `toy_seeds.py` variant scored on the same
prompts and images (its base images are these base images: checked).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TUNING_SETS = ("tuning", "tuning_2")


def leave_one_out(pipe, images) -> list[float]:
    """Each reference's VAE round trip scored against the histogram of the others'."""
    from persres.toy.bench import reference_histogram, vae_round_trip
    from persres.toy.scoring import identity

    rec = vae_round_trip(pipe, images)
    return [identity(rec[i], reference_histogram(pipe, images[:i] + images[i + 1:])) for i in range(len(images))]


def fine_tune_unet(pipe, images, prompt: str, config, lr: float, only: str | None = None) -> dict:
    """Train every UNet weight (`only`: those whose name contains it) on the references, with the
    residual trainer's data and loop; returns the weights before, to restore."""
    import torch
    import torch.nn.functional as F

    from persres.train import cache_inputs, default_resolution, noised, prediction_of

    unet = pipe.unet
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    source = cache_inputs(pipe, images, prompt, default_resolution(pipe), config.flip, chunk=config.batch_size, seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    alphas = pipe.scheduler.alphas_cumprod
    prediction = prediction_of(pipe.scheduler)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    params = []
    for n, p in unet.named_parameters():  # only the selected weights get gradients
        p.requires_grad_(only is None or only in n)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(config.steps):
        batch = source.sample(config.batch_size, gen)
        noise = torch.randn(batch.latents.shape, generator=gen)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (config.batch_size,), generator=gen)
        noisy, target = noised(alphas, batch.latents, noise, t, prediction)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=batch.embedding).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for n, p in unet.named_parameters():
        p.requires_grad_(flags[n])
    return before


def run(args) -> None:
    from persres.settings import train_config_for
    from persres.config import SampleConfig
    from persres.images import read_folder
    from persres.models import load_pipeline, resolve_model
    from persres.sample import generate
    from persres.tokens import identifier_candidates, is_single_token
    from persres.toy import world
    from persres.toy.bench import CONCEPTS_DIR, concept_set_of, prompts_for, reference_histogram
    from persres.toy.scoring import score_image

    model = resolve_model(args.model)
    pipe = load_pipeline(model)
    config = train_config_for(model, {})
    identifier = next(c for c in identifier_candidates() if is_single_token(pipe.tokenizer, c))
    saved = args.out / f"rows-lr{args.lr:g}{'-' + args.only if args.only else ''}.json"
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else []  # resumable per concept
    done = {r["concept"] for r in rows}
    for name in [n for s in args.sets for n in world.CONCEPT_SETS[s]]:
        if name in done:
            continue
        t0 = time.time()
        shape = world.NOVEL_CONCEPTS[name][0]
        refs = [r.image for r in read_folder(CONCEPTS_DIR / name)]
        ref_hist = reference_histogram(pipe, refs)
        ceiling = leave_one_out(pipe, refs)
        prompts = [(k, p) for k, p in enumerate(prompts_for(shape, quick=False)) if p.category == "background"]
        samples = {k: SampleConfig(steps=args.steps, num_images=args.samples, seed=100 * k) for k, _ in prompts}  # the bench's seeds
        base = {k: generate(pipe, p.text.replace("V* ", ""), [], samples[k]).images for k, p in prompts}
        before = fine_tune_unet(pipe, refs, config.prompt.format(identifier=identifier, class_word=shape), config, args.lr, args.only)
        try:
            tuned = {k: generate(pipe, p.text.replace("V*", identifier), [], samples[k]).images for k, p in prompts}
        finally:
            pipe.unet.load_state_dict(before)
        for k, p in prompts:
            for i, (b, f) in enumerate(zip(base[k], tuned[k])):
                scores = {"base": score_image(b, p, ref_hist), "full_fine_tune": score_image(f, p, ref_hist)}
                rows.append({"set": concept_set_of(name), "concept": name, "prompt": p.text, "image": i,
                             **{f"{m} {k}": v for m, s in scores.items() for k, v in s.items()}})
        rows.append({"set": concept_set_of(name), "concept": name, "ceiling": sum(ceiling) / len(ceiling)})
        args.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"lr": args.lr, "only": args.only, "config": config.to_dict(), "identifier": identifier, "rows": rows}))
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)


def report(args) -> None:
    from persres.toy.bench import mean_ci

    runs = {p.stem.removeprefix("rows-"): json.loads(p.read_text())["rows"] for p in sorted(args.out.glob("rows-*.json"))}
    against = json.loads((args.against / "rows.json").read_text())["rows"]
    residual: dict[tuple, list[float]] = {}  # (concept, prompt, image) -> lifts of the packs (training seeds)
    base_there = {}
    for r in against:
        if r["method"] == "base":
            base_there[(r["concept"], r["prompt"], r["image"])] = r["identity"]
    for r in against:
        if r["method"] in ("nolag", "lag"):
            k = (r["concept"], r["prompt"], r["image"])
            residual.setdefault((r["method"],) + k, []).append(r["identity"] - base_there[k])
    out = {"against": str(args.against), "runs": {}}
    for name, rows in runs.items():
        images = [r for r in rows if "ceiling" not in r]
        for r in images:  # the same base pictures on both sides, or the pairing means nothing
            assert abs(r["base identity"] - base_there[(r["concept"], r["prompt"], r["image"])]) < 1e-6, r
        concepts = sorted({r["concept"] for r in images})
        per = {}
        for c in concepts:
            mine = [r for r in images if r["concept"] == c]
            keys = [(c, r["prompt"], r["image"]) for r in mine]
            per[c] = {
                "ceiling": next(r["ceiling"] for r in rows if r.get("ceiling") is not None and r["concept"] == c),
                "base": sum(r["base identity"] for r in mine) / len(mine),
                "full fine-tune lift": sum(r["full_fine_tune identity"] - r["base identity"] for r in mine) / len(mine),
                "full fine-tune background": sum(r["full_fine_tune background"] for r in mine) / len(mine),
                **{f"residual lift, {m}": sum(sum(residual[(m,) + k]) / len(residual[(m,) + k]) for k in keys) / len(keys)
                   for m in ("nolag", "lag")},
            }
        summary = {key: mean_ci([v[key] for v in per.values()]) for key in next(iter(per.values()))}  # over concepts
        out["runs"][name] = {"over concepts": summary, "per concept": per}
        print(name, json.dumps(summary))
    (args.out / "report.json").write_text(json.dumps(out, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--against", type=Path, help="report: a toy_seeds variant folder (its rows.json)")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--sets", nargs="*", default=TUNING_SETS)
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the full fine-tuning")
    ap.add_argument("--only", help="train only the UNet weights whose name contains this (e.g. proj_out)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    args = ap.parse_args(argv)
    run(args) if args.what == "run" else report(args)


if __name__ == "__main__":
    main()
