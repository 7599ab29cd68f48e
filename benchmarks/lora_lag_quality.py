"""Community LoRAs composed four ways on the toy world's held-out concepts: summed, LAG, n-pass, two-phase.

    python -m benchmarks.lora_lag_quality --work ~/.cache/persres-lora-quality --json benchmarks/results/toy-lora_lag_quality.json

Each held-out concept is trained the way people train LoRAs, not persres's way: diffusers' UNet
with a peft adapter (`unet.add_adapter`, as diffusers' train_dreambooth_lora.py does) on every
attention q/k/v/out and feed-forward layer, rank --rank (alpha = rank), AdamW at --lr for --steps
steps of batch 1, on "a photo of IDENT SHAPE"; exported as a kohya file by diffusers' own
`convert_state_dict_to_kohya`; imported by persres (`persres import`, every layer kept). Then every
held-out pair (`persres.toy.bench.pairs_of`) is drawn by the four methods of
`benchmarks.lora_compose` with the same noise (--samples images x --seeds), DDIM --ddim-steps,
guidance 6 (and the base model alone on the same prompt), and scored as `persres bench toy` scores pairs (`persres.toy.scoring.score_group`):
both present, and per side nearer its own colours than the other's and ΔE to its own colours.
The UNet evaluations per image and the wall time per image over the summed run's are reported
beside them. Resumable: trained LoRAs and each pair's rows are kept under --work.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # attention and feed-forward


def train_lora(pipe, images, prompt: str, path: Path, rank: int, lr: float, steps: int, seed: int) -> None:
    """A peft LoRA on a copy of the UNet, trained on `images` with `prompt`, written as a kohya file."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from persres.images import to_tensor

    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        pixels = torch.stack([to_tensor(im) for im in images])
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (N, 4, h, w)
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]
    sched = pipe.scheduler
    for step in range(steps):
        x0 = latents[torch.randint(0, len(latents), (1,))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,))
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "persres-lora-quality")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--prepass", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from benchmarks.lora_compose import METHODS, Composer
    from persres import families
    from persres.images import read_folder
    from persres.models import load_pipeline, resolve_model
    from persres.registry import Registry
    from persres.toy import world
    from persres.toy.bench import CONCEPTS_DIR, BenchConcept, concept_set_of, group_prompt, mean_ci, object_pixels, pairs_of, \
        vae_round_trip
    from persres.toy.scoring import color_histogram, score_group
    from persres.workspace import Workspace

    model = resolve_model("toy")
    pipe = load_pipeline(model)
    args.work.mkdir(parents=True, exist_ok=True)
    ws = Workspace(model, registry=Registry(args.work / "registry"), pipe=pipe)
    names = list(world.CONCEPT_SETS["held_out"])
    idents = ("sks", "zwx", "qrv", "vyk")
    files, refs = {}, {}
    for name, ident in zip(names, idents):  # every LoRA trained on the untouched UNet first
        shape = world.NOVEL_CONCEPTS[name][0]
        refs[name] = [r.image for r in read_folder(CONCEPTS_DIR / name)]
        files[name] = args.work / f"{name}-r{args.rank}-lr{args.lr:g}-s{args.steps}.safetensors"
        if not files[name].exists():
            start = time.perf_counter()
            train_lora(pipe, refs[name], f"a photo of {ident} {shape}", files[name], args.rank, args.lr, args.steps, seed=0)
            print(json.dumps({"trained": name, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    loaded = {}
    for name, ident in zip(names, idents):
        shape = world.NOVEL_CONCEPTS[name][0]
        pack = f"lora-{name}"
        if ws.registry.has(pack):
            ws.registry.remove(pack)
        ws.import_concept(files[name], pack, class_word=shape, identifier=ident)
        bound = ws.apply_concepts([pack])[0]
        vae_refs = vae_round_trip(pipe, refs[name])
        loaded[name] = BenchConcept(name, bound, shape, concept_set_of(name), color_histogram(object_pixels(vae_refs)),
                                    object_pixels(refs[name]), refs[name], vae_refs)
    composer = Composer(pipe)
    side = families.of(pipe).native_side(pipe)
    rows_path = args.work / f"rows-r{args.rank}-lr{args.lr:g}-s{args.steps}.jsonl"
    done = {json.loads(line)["pair"] for line in rows_path.read_text().splitlines()} if rows_path.exists() else set()
    for a, b in pairs_of(loaded):
        pair = f"{a}+{b}"
        if pair in done:
            continue
        group = [loaded[a], loaded[b]]
        _, expanded, used = group_prompt(group)
        rows = []
        for seed in range(args.seeds):
            seeds = [1000 * seed + 999 + i for i in range(args.samples)]
            seconds = {}
            for method in ("base", *METHODS):
                composer.evaluations = 0
                start = time.perf_counter()
                with torch.inference_mode():  # base: the same prompt, no LoRA (what the LoRAs change is measured against it)
                    images = composer.images("summed" if method == "base" else method, expanded, [] if method == "base" else used,
                                             args.ddim_steps, side, seeds, prepass=args.prepass)
                seconds[method] = time.perf_counter() - start
                evaluations = composer.evaluations  # per image: one batched evaluation serves every image of the call
                rows += [{"pair": pair, "method": method, "seed": seed, "evaluations": evaluations,
                          "seconds": seconds[method] / len(seeds), **score_group(im, group)} for im in images]
        with rows_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(json.dumps({"pair": pair}), flush=True)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    summary = {}
    for method in ("base", *METHODS):
        picked = [r for r in rows if r["method"] == method]
        stats = {}
        for metric in ("both_present", "nearer_own", "nearer_own_2", "delta_e", "delta_e_2"):
            values = [r[metric] for r in picked if metric in r]
            stats[metric] = [round(v, 3) for v in mean_ci(values)] if values else None
        summed = [r["seconds"] for r in rows if r["method"] == "summed"]
        stats["evaluations per step"] = round(picked[0]["evaluations"] / args.ddim_steps, 2) if picked else None
        stats["time per image x summed"] = round(sum(r["seconds"] for r in picked) / sum(summed), 2) if picked and summed else None
        stats["images"] = len(picked)
        summary[method] = stats
    report = {"model": model, "concepts": names, "lora": {"targets": TARGETS, "rank": args.rank, "alpha": args.rank, "lr": args.lr,
                                                         "steps": args.steps, "batch": 1},
              "samples": args.samples, "seeds": args.seeds, "ddim_steps": args.ddim_steps, "guidance": 6.0, "prepass": args.prepass,
              "summary (mean, 95% half-width)": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
