"""FLUX.1: `FluxPipeline`, a diffusion transformer (`FluxTransformer2DModel`) trained by flow matching.

- residuals: ΔW = A·B on each single-stream block's `proj_out` (attention + MLP features -> the
  residual stream: 15360 -> 3072 on FLUX.1-dev), the direct analogue of the paper's layer.
- rank: the paper's *budget*, not its ratio: r = 0.05 m gives 108 M parameters on FLUX.1-dev
  (0.91% of its transformer); r = m / 128 = 24 gives 16.8 M, 0.141% of it, as the paper's
  1,239,040 are 0.144% of SD v1.4's UNet (tests/test_flux.py counts both on the real configs).
- text: the T5 states (what its joint attention reads; LAG's positions come from T5's
  tokenizer) and CLIP's pooled vector, T5 padded to `max_text_tokens`.
- LAG on joint attention (`persres.kernels.joint`): a concept's map is the image queries'
  attention to its T5 tokens, from the fused kernel's log-sum-exp; the residual acts on the
  image tokens only. Guidance is an input of the (guidance-distilled) transformer, so the
  batch has no unconditional half.
- training: flow matching, as the pipeline samples. The references' latents are normalized as
  FLUX's VAE expects ((z - shift) * scale) and packed in 2x2 patches as `FluxPipeline` packs
  them. Each step draws σ ~ U(0, 1), shifts it as the pipeline's own scheduler shifts its
  sigmas for this image size (`FlowMatchEulerDiscreteScheduler.time_shift` with μ from the
  image's token count, or its static shift), and trains the velocity on

      x_σ = (1 - σ) x0 + σ ε,      target v = ε - x0,

  at timestep σ with the guidance input the pipeline passes (3.5, its default). One
  transformer forward and backward per step, as on the UNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from persres.families.base import Conditioning, FlowTransformer

FLUX_RANK_RATIO = 1 / 128  # r = m / 128: the paper's share of the model's parameters (see the module doc)
TRAIN_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the value FLUX.1-dev LoRA trainers pass
SINGLE_BLOCKS = "single_transformer_blocks"
BLOCK_RE = re.compile(SINGLE_BLOCKS + r"\.\d+")
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.", "context_embedder")
# sd-scripts' FLUX.1 LoRA names -> the diffusers layers they change (fused ones split by rows, in order)
_DOUBLE = "transformer_blocks.{i}."
_SINGLE = "single_transformer_blocks.{i}."
BFL_LAYERS = (
    ("double_blocks_{i}_img_attn_qkv", tuple(_DOUBLE + f"attn.to_{x}" for x in "qkv")),
    ("double_blocks_{i}_img_attn_proj", (_DOUBLE + "attn.to_out.0",)),
    ("double_blocks_{i}_img_mlp_0", (_DOUBLE + "ff.net.0.proj",)),
    ("double_blocks_{i}_img_mlp_2", (_DOUBLE + "ff.net.2",)),
    ("double_blocks_{i}_img_mod_lin", (_DOUBLE + "norm1.linear",)),
    ("double_blocks_{i}_txt_attn_qkv", tuple(_DOUBLE + f"attn.add_{x}_proj" for x in "qkv")),
    ("double_blocks_{i}_txt_attn_proj", (_DOUBLE + "attn.to_add_out",)),
    ("double_blocks_{i}_txt_mlp_0", (_DOUBLE + "ff_context.net.0.proj",)),
    ("double_blocks_{i}_txt_mlp_2", (_DOUBLE + "ff_context.net.2",)),
    ("double_blocks_{i}_txt_mod_lin", (_DOUBLE + "norm1_context.linear",)),
    ("single_blocks_{i}_linear1", (*(_SINGLE + f"attn.to_{x}" for x in "qkv"), _SINGLE + "proj_mlp")),
    ("single_blocks_{i}_linear2", (_SINGLE + "proj_out",)),
    ("single_blocks_{i}_modulation_lin", (_SINGLE + "norm.linear",)),
    ("img_in", ("x_embedder",)), ("txt_in", ("context_embedder",)),
    ("time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer_linear", ("proj_out",)),
)
CHECKPOINT_KEY = "single_blocks.0.linear2.weight"  # Black Forest Labs' layout, with or without "model.diffusion_model."


@dataclass(frozen=True, eq=False, repr=False)
class Flux1(FlowTransformer):
    def matches_config(self, config) -> bool:
        return config.get("num_single_layers") is not None

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return any(k.endswith(CHECKPOINT_KEY) for k in keys)

    # --- loading ----------------------------------------------------------------------
    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline, {}

    def load_single_file(self, path: str, config: str | None, dtype_kwargs: dict):
        """A FLUX.1 single file is its transformer in Black Forest Labs' layout (flux1-dev.safetensors,
        what ComfyUI loads as a diffusion model): diffusers converts it; the rest of the pipeline
        (VAE, CLIP, T5, scheduler) comes from the configs directory or the cached FLUX.1-dev repo."""
        from diffusers import FluxPipeline, FluxTransformer2DModel

        source = config or self.config_repo
        transformer = FluxTransformer2DModel.from_single_file(path, config=source, subfolder="transformer", local_files_only=True,
                                                              **dtype_kwargs)
        return FluxPipeline.from_pretrained(source, transformer=transformer, local_files_only=True, **dtype_kwargs)

    def blocks(self, model) -> dict:
        return {f"{SINGLE_BLOCKS}.{i}": block for i, block in enumerate(getattr(model, SINGLE_BLOCKS))}

    def block_names_in(self, keys) -> set[str]:
        return {b for b in (k.removesuffix(".proj_out.weight") for k in keys if k.endswith(".proj_out.weight")) if BLOCK_RE.fullmatch(b)}

    def reads_text(self, path: str) -> bool:  # the double-stream blocks' text stream and the T5 projection
        return any(part in path for part in TEXT_STREAM)

    # --- text -------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        model = pipe.transformer
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=model.device, num_images_per_prompt=1,
                                               max_sequence_length=max_text_tokens(pipe))
        return Conditioning(embeds.to(model.dtype), {"pooled_projections": pooled.to(model.dtype)})

    def region_tokenizer(self, pipe):  # the joint attention reads the T5 states; CLIP gives only the pooled vector
        return pipe.tokenizer_2

    def check_training_prompt(self, pipe, prompt: str, identifier: str, class_word: str) -> None:
        from persres.tokens import concept_positions

        super().check_training_prompt(pipe, prompt, identifier, class_word)
        concept_positions(pipe.tokenizer_2, prompt, identifier, class_word)

    # --- training ---------------------------------------------------------------------
    def latent_normalization(self, pipe):
        return pipe.vae.config.get("shift_factor") or 0.0, pipe.vae.config.scaling_factor

    def objective(self, pipe, source, config):
        return flow_matching_objective(pipe, source, config.batch_size)

    # --- sampling ---------------------------------------------------------------------
    def native_side(self, pipe) -> int:  # the pipeline's default (1024 px on FLUX.1)
        return pipe.default_sample_size * pipe.vae_scale_factor

    def sampling_arguments(self, pipe, config) -> dict:  # its Euler sampler has no eta
        return {"max_sequence_length": max_text_tokens(pipe)}

    def guidance_in_batch(self, guidance: float) -> bool:
        return False

    def lag_processor(self):
        from persres.kernels.joint import JointAttnProcessor

        return JointAttnProcessor

    def kohya_key(self, block: str, blocks) -> str:  # sd-scripts' name: BFL's single_blocks.N.linear2
        return f"lora_unet_single_blocks_{block.removeprefix(SINGLE_BLOCKS + '.')}_linear2"

    def kohya_layer_names(self, paths, blocks) -> dict[str, tuple[str, ...]]:
        """sd-scripts' names (Black Forest Labs' layout, q/k/v and the single blocks' MLP input fused)
        and the diffusers layout under `lora_transformer_` (OneTrainer; what ComfyUI reads too)."""
        out = {"lora_transformer_" + p.replace(".", "_"): (p,) for p in paths}
        out.update({"lora_unet_" + name: targets for name, targets in original_layer_names(BFL_LAYERS, paths).items()})
        return out

    def kohya_layer_key(self, path: str, blocks) -> str:
        return "lora_transformer_" + path.replace(".", "_")


FLUX1 = Flux1("flux", "FLUX.1", "FluxPipeline", "black-forest-labs/FLUX.1-dev", "flux1", "flux-1-dev", 1024,
              guidance=3.5, train_defaults={"rank_ratio": FLUX_RANK_RATIO}, denoiser_folder="transformer",
              implementation="https://github.com/black-forest-labs/flux", suggests_class=False,
              sequence_encoders=(("text_encoder_2", "tokenizer_2"),),
              kohya_text_prefixes=(("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")))


def original_layer_names(table, paths) -> dict[str, tuple[str, ...]]:
    """`table`'s names of an original layout ("{i}": a block's number) -> the diffusers layers each changes
    (several where the original fuses them, their rows in order), for every one whose layers `paths` holds."""
    paths = set(paths)
    out = {}
    for name, parts in table:
        prefix = parts[0].split("{")[0]
        numbers = sorted({int(p.split(".")[1]) for p in paths if p.startswith(prefix)}) if "{" in parts[0] else [None]
        for i in numbers:
            targets = tuple(part.format(i=i) for part in parts)
            if all(t in paths for t in targets):
                out[name.format(i=i)] = targets
    return out


def max_text_tokens(pipe) -> int:
    """The T5 sequence length: its tokenizer's limit, at most FLUX.1-dev's 512 (what the pipeline
    pads to, so token positions are the same in training and sampling)."""
    return min(512, pipe.tokenizer_2.model_max_length)


# --- flow-matching training ---------------------------------------------------------------
def pack(pipe, latents):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): the pipeline's 2x2 patches, row by row."""
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def pack_mask(mask):
    """(N, 1, h, w) latent-cell mask -> (N, h/2 * w/2, 1): a patch counts where all its cells do."""
    import torch.nn.functional as F

    return (F.avg_pool2d(mask, 2) == 1).float().flatten(1).unsqueeze(-1)


def image_ids(pipe, h: int, w: int, device):
    """(h/2 * w/2, 3) position ids of the packed image tokens, as the pipeline makes them."""
    import torch

    return pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)


def image_shift(scheduler, tokens: int) -> float | None:
    """μ of the scheduler's resolution-dependent shift for `tokens` image tokens (the pipeline's
    `calculate_shift`), or None where the scheduler shifts by a fixed amount."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    if not c.get("use_dynamic_shifting", False):
        return None
    return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def shifted_sigmas(scheduler, u, mu: float | None):
    """σ from uniform draws `u`, shifted as the scheduler shifts its sampling sigmas."""
    if mu is not None:
        return scheduler.time_shift(mu, 1.0, u)
    shift = scheduler.config.get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_objective(pipe, source, batch_size: int):
    """`loss(generator)`: one batch's flow-matching loss over `source` (a `persres.train.CachedBatchSource`
    of this pipeline: everything computed once)."""
    import torch

    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    h, w = source.mean.shape[-2:]
    ids = image_ids(pipe, h, w, device)
    text_ids = torch.zeros(source.condition.embedding.shape[1], 3, device=device)  # (T, 3): text tokens sit at 0, as the pipeline's
    guidance = torch.full((batch_size,), TRAIN_GUIDANCE, device=device) if transformer.config.guidance_embeds else None

    def velocity(noisy, sigma, batch):
        return transformer(hidden_states=noisy.to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                           pooled_projections=batch.added["pooled_projections"], encoder_hidden_states=batch.embedding,
                           txt_ids=text_ids, img_ids=ids, return_dict=False)[0]

    return packed_flow_objective(pipe, source, batch_size, "FLUX", velocity)


def packed_flow_objective(pipe, source, batch_size: int, label: str, velocity, tokens=None, shift=image_shift):
    """`loss(generator)` of a transformer that reads latents packed in 2x2 patches and predicts the
    velocity ε - x0 at timestep σ: `velocity(x_σ (B, L, 4C), σ (B,), batch)` calls it as its pipeline does.
    `tokens(latents (B, C, h, w))` packs a batch as the pipeline packs it (FLUX.1's `pack` where not
    given); `shift(scheduler, L)` is the μ the pipeline shifts its sigmas by for L image tokens."""
    import torch

    from persres.errors import InputError

    scheduler, device = pipe.scheduler, pipe.transformer.device
    h, w = source.mean.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"{label} packs latents in 2x2 patches: the training resolution must be a multiple of "
                         f"{2 * pipe.vae_scale_factor} px")
    mu = shift(scheduler, (h // 2) * (w // 2))
    tokens = tokens or (lambda latents: pack(pipe, latents))

    def loss(generator):
        batch = source.sample(batch_size, generator)
        x0 = tokens(batch.latents)  # (B, L, 4C)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        u = torch.rand((batch_size,), generator=generator, device=device)
        sigma = shifted_sigmas(scheduler, u, mu).view(-1, 1, 1)  # (B, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        pred = velocity(noisy, sigma.flatten(), batch)
        err = (pred.float() - (noise - x0)) ** 2  # (B, L, 4C)
        if batch.mask is None:
            return err.mean()
        mask = pack_mask(batch.mask)  # (B, L, 1)
        return (err * mask).sum() / (mask.sum() * err.shape[-1])

    return loss
