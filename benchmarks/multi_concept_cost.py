"""Several concepts in one image: what each way of composing them costs per denoising step.

    python -m benchmarks.multi_concept_cost --resolutions 128 --repeats 3 --json benchmarks/results/cpu-multi_concept_cost-128.json
    python -m benchmarks.multi_concept_cost --resolutions 256 --ks 1,4 --repeats 2 --json benchmarks/results/cpu-multi_concept_cost-256.json

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
(text encoding and decoding left out). Each run follows a plain run of its own, and its ratio
to that run is its cost: the median of those ratios over --repeats (drift on a shared machine
cancels within a pair).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import StepClock, machine

CONCEPTS = (("dog", "sks", "dog"), ("cat", "zwx", "cat"), ("vase", "qrv", "vase"), ("chair", "vfx", "chair"))


def prompt_for(k: int) -> str:
    return "a photo of " + " and ".join(f"a {ident} {word}" for _, ident, word in CONCEPTS[:k]) + " in a garden"


class NPass:
    """The N-pass regional baseline (see the module doc) on a pipeline whose UNet holds the concepts:
    an untouched copy of the UNet takes each concept's merged weights in turn."""

    def __init__(self, pipe):
        from persres import residuals

        self.pipe = pipe
        self.plain_unet = copy.deepcopy(pipe.unet)
        residuals.remove(self.plain_unet)  # the original proj_out modules, unmerged
        layers = residuals.layers_of(pipe.unet)
        self.proj_outs = {block: self.plain_unet.get_submodule(f"{block}.proj_out") for block in layers}
        self.weights = {"plain": {b: p.weight.detach().clone() for b, p in self.proj_outs.items()}}
        for name in next(iter(layers.values())).residuals:
            self.weights[name] = {b: (l.weight.detach().float().view(l.channels, l.channels) + l.residuals[name].delta_weight())
                                  .view_as(l.weight).to(l.weight.dtype) for b, l in layers.items()}

    def use(self, name: str) -> None:
        """The copy's proj_out weights: W + ΔW of concept `name`, or W ("plain")."""
        for block, proj_out in self.proj_outs.items():
            proj_out.weight.copy_(self.weights[name][block])

    def latents(self, prompt: str, concepts, steps: int, side: int, seeds, guidance: float = 7.5, on_step=lambda done, total: None,
                multi=None):
        """(N, 4, h, w) latents after `steps` DDIM steps, one per seed (the same initial noise `generate` draws)."""
        from diffusers import DDIMScheduler

        from persres import residuals
        from persres.config import MultiLagConfig
        from persres.lag import lag_regions
        from persres.sample import concept_tokens

        pipe, n = self.pipe, len(seeds)
        device, dtype = pipe.unet.device, pipe.unet.dtype
        tokens = concept_tokens(pipe.tokenizer, prompt, concepts)
        cond, uncond = pipe.encode_prompt(prompt, device, n, True)
        context = torch.cat([uncond, cond])  # (2N, T, C)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, side, side, dtype, device, generators)
        names = [c.name for c in concepts]

        def guided(unet, x, t):
            eps = unet(x, t, encoder_hidden_states=context).sample
            uncond_eps, cond_eps = eps.chunk(2)
            return uncond_eps + guidance * (cond_eps - uncond_eps)

        # the base evaluation runs the concepts at strength 0: the base model's output, and LAG's regions kept
        with residuals.use_concepts(pipe.unet, names, merged=False, strengths={c: 0.0 for c in names}), \
                lag_regions(pipe.unet, tokens, guided=True, latent_hw=tuple(latents.shape[-2:]), keep_masks=True,
                            multi=multi or MultiLagConfig(), steps=steps) as session:
            for i, t in enumerate(scheduler.timesteps):
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                before = {c: m.clone() for c, m in session.mask_sums.items()}
                kept_before = session.mask_counts
                eps = guided(pipe.unet, x, t)
                session.end_evaluation()  # this evaluation's masks kept now (the next evaluation's start finds nothing left)
                blocks = session.mask_counts - kept_before
                if blocks:  # past the delay: one pass per concept, blended where its region is
                    for c in names:
                        region = (session.mask_sums[c] - before.get(c, 0)) / blocks  # (N, h, w): the cond half's share of blocks
                        mask = (region >= 0.5).to(eps.dtype)[:, None]  # (N, 1, h, w)
                        self.use(c)
                        eps = eps + mask * (guided(self.plain_unet, x, t) - eps)
                latents = scheduler.step(eps, t, latents).prev_sample
                on_step(i + 1, steps)
        self.use("plain")
        return latents

    def images(self, *args, **kwargs):
        """`latents` decoded: PIL images."""
        latents = self.latents(*args, **kwargs)
        vae = self.pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")


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
    from persres.testing import SD14_UNET_CONFIG, sd14_random_pipeline
    from persres.tokens import BoundConcept

    device = torch.device("cpu")
    dtype = pick_dtype(args.precision, device, SD14_UNET_CONFIG)
    pipe = sd14_random_pipeline(dtype=dtype, device=device)
    concepts = [BoundConcept(name, ident, word) for name, ident, word in CONCEPTS]
    ranks = residuals.ranks_for(pipe.unet)
    for i, c in enumerate(concepts):
        residuals.new_concept(pipe.unet, c.name, ranks, init="random", seed=i)
    baseline = NPass(pipe)
    plain_unet = baseline.plain_unet
    plain = StableDiffusionPipeline(**{**pipe.components, "unet": plain_unet})
    plain.set_progress_bar_config(disable=True)
    clock = StepClock(pipe.unet, plain_unet)
    on_step = clock.on_step

    ks = [int(k) for k in args.ks.split(",")]
    report = {"machine": machine(), "precision": str(dtype).removeprefix("torch."), "steps": args.steps, "guidance": 7.5,
              "resolutions": {}}
    for side in (int(r) for r in args.resolutions.split(",")):
        cfg = SampleConfig(height=side, width=side, guidance=7.5)
        plain_run = lambda steps: generate(plain, prompt_for(1), [], cfg.replace(steps=steps), on_step=on_step)  # noqa: E731
        variants = {}
        for k in ks:
            variants[f"merged-{k}"] = lambda steps, k=k: generate(pipe, prompt_for(k), concepts[:k], cfg.replace(steps=steps, lag=False),
                                                                  on_step=on_step)
            variants[f"lag-{k}"] = lambda steps, k=k: generate(pipe, prompt_for(k), concepts[:k], cfg.replace(steps=steps, lag=True),
                                                               on_step=on_step)
            variants[f"n-pass-{k}"] = lambda steps, k=k: baseline.latents(prompt_for(k), concepts[:k], steps, side, [0], on_step=on_step)

        def per_step(run, steps: int) -> tuple[float, int]:
            clock.reset()
            with torch.inference_mode():
                run(steps)
            return clock.per_step(steps), clock.evaluations

        seconds: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}  # each run over the plain run just before it: drift cancels
        evaluations: dict[str, int] = {}
        for rep in range(args.repeats + 1):  # round 0 warms up, 5 steps each
            steps = args.steps if rep else 5
            for name, run in variants.items():
                plain_s, evaluations["plain"] = per_step(plain_run, steps)
                s, evaluations[name] = per_step(run, steps)
                if rep:
                    seconds.setdefault("plain", []).append(plain_s)
                    seconds.setdefault(name, []).append(s)
                    ratios.setdefault(name, []).append(s / plain_s)
                    print(f"{side} px {name}: {s:.3f} s/step ({s / plain_s:.3f}x the plain run before it), "
                          f"{evaluations[name]} UNet evaluations", flush=True)
        median = {name: statistics.median(v) for name, v in seconds.items()}
        ratio = {name: statistics.median(v) for name, v in ratios.items()}
        report["resolutions"][str(side)] = {
            "seconds per step": {n: round(v, 4) for n, v in median.items()},
            "UNet evaluations per image": evaluations,
            "relative to plain (median of paired ratios)": {n: round(v, 3) for n, v in ratio.items()},
            "lag relative to merged": {f"k={k}": round(statistics.median([a / b for a, b in zip(ratios[f"lag-{k}"], ratios[f"merged-{k}"])]), 3)
                                       for k in ks},
        }
        if args.json:  # written after each resolution: a stopped run keeps what it measured
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
