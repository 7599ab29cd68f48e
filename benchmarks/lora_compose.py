"""Four ways to put several LoRAs in one picture, on one denoising loop (shared by
`lora_lag_cost` and `lora_lag_quality`):

- summed:    every LoRA merged into the weights, everywhere (one evaluation per step);
- lag:       persres LAG, each LoRA in its own automatic region from the same evaluation's
             attention (one evaluation per step);
- n-pass:    per step one base evaluation (its attention gives the regions, as LAG finds them,
             after LAG's delay) and one evaluation per LoRA with that LoRA alone, the noise
             predictions blended by region (Regional Prompter's latent mode, ComfyUI's masked hooks);
- two-phase: FreeFuse's way: a pre-pass of the base model over the first `prepass` steps gives
             each LoRA a region (its attention maps averaged, binarized as LAG binarizes them),
             then a second, full pass from the same noise with every LoRA masked to its region.

All four run DDIM from the pipeline's scheduler config with classifier-free guidance, the same
initial noise per seed, and count their UNet evaluations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

METHODS = ("summed", "lag", "n-pass", "two-phase")


class FixedRegions:
    """A `residuals.RegionSource` of masks fixed before the pass: (N, K, H, W) in {0, 1}, the same for
    each half of a guided batch, read at each layer's resolution; layers that read the prompt get the
    concept's own token rows."""

    def __init__(self, masks: torch.Tensor, names, positions, guided: bool):
        self.masks, self.index, self.positions, self.guided = masks, {n: k for k, n in enumerate(names)}, positions, guided

    def region(self, block, concept, x):
        return self._at(concept, x, False)

    def layer_region(self, layer, concept, x):
        return self._at(concept, x, layer.text)

    def _at(self, concept, x, text):
        if concept not in self.index:
            return None
        k = self.index[concept]
        if text:
            mask = x.new_zeros(x.shape[0], x.shape[1])
            mask[x.shape[0] // 2 if self.guided else 0:, [p for p in self.positions[concept] if p < x.shape[1]]] = 1
            return mask.unsqueeze(-1)
        masks = self.masks[:, k : k + 1].repeat(x.shape[0] // self.masks.shape[0], 1, 1, 1)  # (B, 1, H, W)
        if x.ndim == 4:
            return F.interpolate(masks, size=x.shape[2:], mode="nearest").to(x.dtype)
        if x.ndim != 3:
            return None
        lh, lw = self.masks.shape[2:]
        factor = math.sqrt(lh * lw / x.shape[1])
        grid = F.interpolate(masks, size=(round(lh / factor), round(lw / factor)), mode="nearest")
        return grid.flatten(2).transpose(1, 2).to(x.dtype)  # (B, N, 1)


def regions_of(mask_sums: dict[str, torch.Tensor], names) -> torch.Tensor:
    """(B, K, h, w) disjoint regions from averaged masks: on where at least half the blocks and steps
    had it on; where several are on, the one on most often."""
    shares = torch.stack([mask_sums[n] for n in names], dim=1)  # (B, K, h, w) in [0, 1]
    on = shares >= 0.5
    winner = F.one_hot(shares.argmax(dim=1), len(names)).permute(0, 3, 1, 2).bool()
    return (on & winner).float()


class Composer:
    """The four methods on one pipeline whose denoiser holds the LoRAs (loaded with persres)."""

    def __init__(self, pipe):
        from persres import residuals

        self.pipe = pipe
        self.copy = copy.deepcopy(pipe.unet)  # the passes that need a second model run on this one
        self.evaluations = 0
        self.first_evaluation: float | None = None  # perf_counter() at the first UNet evaluation since `evaluations` was reset
        for unet in (pipe.unet, self.copy):
            unet.register_forward_pre_hook(lambda module, args: self._count())
        self.residuals = residuals

    def _count(self):
        if self.evaluations == 0:
            self.first_evaluation = time.perf_counter()
        self.evaluations += 1

    def latents(self, method: str, prompt: str, concepts, steps: int, side: int, seeds, guidance: float = 6.0,
                prepass: int = 5, multi=None, on_step=lambda done, total: None):
        from diffusers import DDIMScheduler

        from persres.config import MultiLagConfig
        from persres.lag import lag_regions
        from persres.sample import concept_tokens

        pipe, n = self.pipe, len(seeds)
        unet = pipe.unet
        device, dtype = unet.device, unet.dtype
        multi = multi or MultiLagConfig()
        tokens = concept_tokens(pipe.tokenizer, prompt, concepts)
        names = [c.name for c in concepts]
        cond, uncond = pipe.encode_prompt(prompt, device, n, True)
        context = torch.cat([uncond, cond])  # (2N, T, C)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        start = pipe.prepare_latents(n, unet.config.in_channels, side, side, dtype, device, generators)
        hw = tuple(start.shape[-2:])
        use = self.residuals.use_concepts

        def guided(model, x, t):
            eps = model(x, t, encoder_hidden_states=context).sample
            uncond_eps, cond_eps = eps.chunk(2)
            return uncond_eps + guidance * (cond_eps - uncond_eps)

        def loop(step_fn, count):
            scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            scheduler.set_timesteps(steps)
            latents = start
            for i, t in enumerate(scheduler.timesteps[:count]):
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                latents = scheduler.step(step_fn(i, x, t), t, latents).prev_sample
                on_step(i + 1, steps)
            return latents

        if method == "summed":
            with use(unet, names, merged=True):
                return loop(lambda i, x, t: guided(unet, x, t), steps)
        if method == "lag":
            with use(unet, names, merged=False), lag_regions(unet, tokens, guided=True, latent_hw=hw, multi=multi, steps=steps):
                return loop(lambda i, x, t: guided(unet, x, t), steps)
        zero = {c: 0.0 for c in names}  # the base model's output, LAG's regions kept
        if method == "n-pass":
            with use(unet, names, merged=False, strengths=zero), \
                    lag_regions(unet, tokens, guided=True, latent_hw=hw, keep_masks=True, multi=multi, steps=steps) as session:
                def step(i, x, t):
                    before, kept = {c: m.clone() for c, m in session.mask_sums.items()}, session.mask_counts
                    eps = guided(unet, x, t)
                    session.end_evaluation()
                    blocks = session.mask_counts - kept
                    if not blocks:  # LAG's delay: the base model alone
                        return eps
                    now = {c: (session.mask_sums[c] - before.get(c, 0)) / blocks for c in names}
                    regions = regions_of(now, names)  # (N, K, h, w): the cond half's
                    for k, c in enumerate(names):
                        with use(self.copy, [c], merged=False):
                            eps = eps + regions[:, k : k + 1] * (guided(self.copy, x, t) - eps)
                    return eps

                return loop(step, steps)
        if method == "two-phase":
            with use(unet, names, merged=False, strengths=zero), \
                    lag_regions(unet, tokens, guided=True, latent_hw=hw, keep_masks=True, multi=dataclasses.replace(multi, delay=0.0),
                                steps=steps) as session:
                loop(lambda i, x, t: guided(unet, x, t), prepass)
            regions = regions_of(session.average_masks(), names)  # (N, K, h, w): the cond half's
            source = FixedRegions(regions, names, {c.name: c.positions for c in tokens}, guided=True)
            wrappers = self.residuals.all_layers(self.copy).values()
            with use(self.copy, names, merged=False):
                for w in wrappers:
                    w.regions = source
                try:
                    return loop(lambda i, x, t: guided(self.copy, x, t), steps)
                finally:
                    for w in wrappers:
                        w.regions = None
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")

    def images(self, *args, **kwargs):
        latents = self.latents(*args, **kwargs)
        vae = self.pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")
