"""Several concepts in one image: what each way of composing them costs per denoising step.

    python -m benchmarks.multi_concept_cost --resolutions 128 --repeats 2 --json benchmarks/results/cpu-multi_concept_cost-128.json
    python -m benchmarks.multi_concept_cost --resolutions 256 --ks 1,4 --json benchmarks/results/cpu-multi_concept_cost-256.json

SD v1.4's architecture with random weights (the cost, not the picture), DDIM, CFG (one
batched UNet evaluation of [uncond, cond] per pass), k = 1-4 concepts with random residuals,
side by side:

- plain:   diffusers' pipeline on an untouched UNet, the prompt alone;
- merged:  persres, the k residuals summed into the weights (one pass per step);
- lag:     persres LAG, each concept in its own automatic region (one pass per step);
- n-pass:  the regional multi-LoRA way (Regional Prompter's latent mode, masked composition):
           per step one base evaluation, then one evaluation per concept with that concept's
           residual merged, the noise predictions blended by the same automatic regions LAG
           finds (from the base evaluation's attention, kept as the LAG session keeps masks).
           During LAG's delay (the first 20% of the steps) it runs the base evaluation alone,
           as LAG does, which favours it.

Per-step time: from the first UNet evaluation to the end of the last step, over the steps
(text encoding and decoding left out); the median over --repeats, the variants interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine

CONCEPTS = (("dog", "sks", "dog"), ("cat", "zwx", "cat"), ("vase", "qrv", "vase"), ("chair", "vfx", "chair"))


def prompt_for(k: int) -> str:
    return "a photo of " + " and ".join(f"a {ident} {word}" for _, ident, word in CONCEPTS[:k]) + " in a garden"


class Clock:
    """Counts the UNet evaluations of a run and times them from the first one on."""

    def __init__(self, *unets):
        self.evaluations, self.started = 0, None
        self.hooks = [u.register_forward_pre_hook(self._pre) for u in unets]

    def _pre(self, module, args) -> None:
        self.evaluations += 1
        if self.started is None:
            self.started = time.perf_counter()

    def reset(self) -> None:
        self.evaluations, self.started = 0, None


def n_pass(pipe, plain_unet, merged_weights, concepts, prompt: str, steps: int, side: int, seed: int, on_step):
    """The N-pass regional baseline (see the module doc): latents after `steps` DDIM steps."""
    from diffusers import DDIMScheduler

    from persres import residuals
    from persres.config import MultiLagConfig
    from persres.lag import lag_regions
    from persres.sample import concept_tokens

    device, guidance = pipe.unet.device, 7.5
    tokens = concept_tokens(pipe.tokenizer, prompt, concepts)
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    context = torch.cat([uncond, cond])  # (2, T, C)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, side // 8, side // 8, generator=generator).to(device, pipe.unet.dtype) * scheduler.init_noise_sigma
    proj_outs = {block: plain_unet.get_submodule(f"{block}.proj_out") for block in merged_weights["plain"]}
    names = [c.name for c in concepts]

    def guided(unet, x, t):
        eps = unet(x, t, encoder_hidden_states=context).sample
        uncond_eps, cond_eps = eps.chunk(2)
        return uncond_eps + guidance * (cond_eps - uncond_eps)

    # the base evaluation runs the concepts at strength 0: the base model's output, and LAG's regions kept
    with residuals.use_concepts(pipe.unet, names, merged=False, strengths={n: 0.0 for n in names}), \
            lag_regions(pipe.unet, tokens, cfg=True, latent_hw=latents.shape[-2:], keep_masks=True,
                        multi=MultiLagConfig(), steps=steps) as session:
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            before = {n: s.clone() for n, s in session.mask_sums.items()}
            kept_before = session.mask_counts
            eps = guided(pipe.unet, x, t)
            blocks = session.mask_counts - kept_before
            if blocks:  # past the delay: one pass per concept, blended where its region is
                for c in concepts:
                    region = (session.mask_sums[c.name] - before.get(c.name, 0)) / blocks  # (2, h, w), share of blocks
                    mask = (region[-1:] >= 0.5).to(eps.dtype)[:, None]  # (1, 1, h, w): the cond half decides
                    for block, proj_out in proj_outs.items():
                        proj_out.weight.copy_(merged_weights[c.name][block])
                    eps = eps + mask * (guided(plain_unet, x, t) - eps)
            latents = scheduler.step(eps, t, latents).prev_sample
            on_step(i + 1, steps)
    for block, proj_out in proj_outs.items():
        proj_out.weight.copy_(merged_weights["plain"][block])
    return latents


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", default="128,256")
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    from persres import residuals
    from persres.config import SampleConfig
    from persres.models import pick_dtype
    from persres.sample import generate
    from persres.testing import sd14_random_pipeline
    from persres.tokens import BoundConcept

    device = torch.device("cpu")
    dtype = pick_dtype(args.precision, device)
    pipe = sd14_random_pipeline(dtype=dtype, device=device)
    plain_unet = copy.deepcopy(pipe.unet)
    plain = StableDiffusionPipeline(**{**pipe.components, "unet": plain_unet})
    plain.set_progress_bar_config(disable=True)
    concepts = [BoundConcept(name, ident, word) for name, ident, word in CONCEPTS]
    ranks = residuals.ranks_for(pipe.unet)
    for i, c in enumerate(concepts):
        residuals.new_concept(pipe.unet, c.name, ranks, init="random", seed=i)
    # the baseline's per-concept passes: W + ΔW_k swapped into the untouched UNet's proj_out
    layers = residuals.layers_of(pipe.unet)
    merged_weights = {"plain": {b: l.weight.detach().clone() for b, l in layers.items()}}
    for c in concepts:
        merged_weights[c.name] = {b: (l.weight.detach().float().view(l.channels, l.channels) + l.residuals[c.name].delta_weight())
                                  .view_as(l.weight).to(dtype) for b, l in layers.items()}
    clock = Clock(pipe.unet, plain_unet)
    ends: list[float] = []

    def on_step(done, total):
        if done == total:
            ends.append(time.perf_counter())

    ks = [int(k) for k in args.ks.split(",")]
    report = {"machine": machine(), "precision": str(dtype).removeprefix("torch."), "steps": args.steps, "guidance": 7.5,
              "resolutions": {}}
    for side in (int(r) for r in args.resolutions.split(",")):
        cfg = SampleConfig(height=side, width=side, guidance=7.5)
        variants = {"plain": lambda steps: generate(plain, prompt_for(1), [], cfg.replace(steps=steps), on_step=on_step)}
        for k in ks:
            variants[f"merged-{k}"] = lambda steps, k=k: generate(pipe, prompt_for(k), concepts[:k], cfg.replace(steps=steps, lag=False),
                                                                  on_step=on_step)
            variants[f"lag-{k}"] = lambda steps, k=k: generate(pipe, prompt_for(k), concepts[:k], cfg.replace(steps=steps, lag=True),
                                                               on_step=on_step)
            variants[f"n-pass-{k}"] = lambda steps, k=k: n_pass(pipe, plain_unet, merged_weights, concepts[:k], prompt_for(k), steps, side, 0,
                                                                on_step)
        per_step: dict[str, list[float]] = {}
        evaluations: dict[str, int] = {}
        for rep in range(args.repeats + 1):  # round 0 warms up, 5 steps each
            for name, run in variants.items():
                clock.reset()
                ends.clear()
                with torch.inference_mode():
                    run(args.steps if rep else 5)
                if rep:
                    per_step.setdefault(name, []).append((ends[-1] - clock.started) / args.steps)
                    evaluations[name] = clock.evaluations
                    print(f"{side} px {name}: {per_step[name][-1]:.3f} s/step, {clock.evaluations} UNet evaluations", flush=True)
        median = {name: sorted(v)[len(v) // 2] for name, v in per_step.items()}
        report["resolutions"][str(side)] = {
            "seconds per step": {n: round(v, 4) for n, v in median.items()},
            "UNet evaluations": evaluations,
            "relative to plain": {n: round(v / median["plain"], 3) for n, v in median.items()},
            "lag-1 relative to merged-1": round(median["lag-1"] / median["merged-1"], 3) if 1 in ks else None,
        }
        if args.json:  # written after each resolution: a stopped run keeps what it measured
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
