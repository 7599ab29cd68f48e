"""Z-Image: `ZImagePipeline`, a single-stream diffusion transformer (`ZImageTransformer2DModel`) with a
Qwen3 text encoder, trained by flow matching (Z-Image-Turbo: 8 steps, no guidance).

- residuals: ΔW = A·B on each main layer's attention output projection `layers.N.attention.to_out.0`
  (3840 -> 3840 on Z-Image-Turbo). A Z-Image layer has no proj_out: its joint attention over image
  and text tokens is where the prompt reaches the image, and `to_out.0` writes that attention's
  result into the residual stream, as the paper's proj_out writes its transformer's (attention
  and feed-forward) back into the UNet's. The refiners stay as they are: the noise refiner sees no
  text and the context refiner no image.
- rank: r = m / 100 = 38 gives 8,755,200 parameters, 0.142% of the transformer, the share the
  paper's 1,239,040 are of SD v1.4's UNet (0.144%; tests/test_zimage.py counts both).
- text: the pipeline's own encoding, the Qwen3 states (the second-to-last hidden layer) of the
  prompt inside the tokenizer's chat template, padding dropped. LAG's token positions are read off
  the same templated sequence (`TemplatedTokens`).
- LAG: the main layers attend over [N image tokens (padded to a multiple of 32), T text tokens];
  a concept's map is the image queries' attention to its text columns, from the fused kernel's
  log-sum-exp; the residual acts on the image tokens only. Under guidance the batch is
  [conditional, unconditional] with prompts of different lengths: each length runs its own
  attention over its own keys (what the pipeline's key-padding mask does, exactly).
- training: the transformer is called as the pipeline calls it, on the references' latents
  ((z - shift) * scale) with σ ~ U(0, 1) shifted as the pipeline's scheduler shifts its sigmas,
  at timestep 1 - σ; it predicts x0 - ε (the pipeline negates it into the scheduler's velocity).
"""

from __future__ import annotations

from dataclasses import dataclass

from persres.families.base import Conditioning, FlowTransformer

ZIMAGE_RANK_RATIO = 1 / 100  # r = m / 100: the paper's share of the model's parameters (see the module doc)
MAX_TEXT_TOKENS = 512  # ZImagePipeline's max_sequence_length
SEQ_MULTI_OF = 32  # the transformer pads the image tokens to a multiple of this
LAYERS = "layers"
PROJECTION = "attention.to_out.0"
TEXT_PARTS = ("context_refiner.", "cap_embedder.")  # layers that read the prompt's tokens alone
CHECKPOINT_KEY = "layers.0.adaLN_modulation.0.weight"  # the original layout (diffusers' own detection key)


@dataclass(frozen=True, eq=False, repr=False)
class ZImage(FlowTransformer):
    def matches_config(self, config) -> bool:
        return config.get("cap_feat_dim") is not None and config.get("n_refiner_layers") is not None

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return any(k.endswith(CHECKPOINT_KEY) for k in keys) and any("context_refiner." in k for k in keys)

    # --- loading ----------------------------------------------------------------------
    def pipeline_class(self):
        try:
            from diffusers import ZImagePipeline
        except ImportError:
            from persres.errors import InputError

            raise InputError("Z-Image needs a diffusers release with ZImagePipeline: pip install -U diffusers") from None
        return ZImagePipeline, {}

    def load_single_file(self, path: str, config: str | None, dtype_kwargs: dict):
        """A Z-Image single file is its transformer in the original layout (z_image_turbo_bf16.safetensors,
        what ComfyUI loads as a diffusion model): diffusers converts it; the rest of the pipeline comes
        from the configs directory or the cached Z-Image-Turbo repo."""
        self.pipeline_class()  # a diffusers without Z-Image: one line
        from diffusers import ZImagePipeline, ZImageTransformer2DModel

        source = config or self.config_repo
        transformer = ZImageTransformer2DModel.from_single_file(path, config=source, subfolder="transformer",
                                                                local_files_only=True, **dtype_kwargs)
        return ZImagePipeline.from_pretrained(source, transformer=transformer, local_files_only=True, **dtype_kwargs)

    def blocks(self, model) -> dict:
        return {f"{LAYERS}.{i}": layer for i, layer in enumerate(getattr(model, LAYERS))}

    def block_names_in(self, keys) -> set[str]:
        suffix = f".{PROJECTION}.weight"
        return {b for b in (k.removesuffix(suffix) for k in keys if k.endswith(suffix)) if b.startswith(LAYERS + ".")}

    def reads_text(self, path: str) -> bool:
        return any(path.startswith(part) for part in TEXT_PARTS)

    # --- text -------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        model = pipe.transformer
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=model.device, do_classifier_free_guidance=False,
                                       max_sequence_length=max_text_tokens(pipe))
        return Conditioning(embeds[0].unsqueeze(0).to(model.dtype))  # (1, T, D): the prompt's tokens, no padding

    def region_tokenizer(self, pipe):
        from persres.families.templated import TemplatedTokens, chat_frame

        return TemplatedTokens(pipe.tokenizer, max_text_tokens(pipe), chat_frame(pipe.tokenizer))

    def identifier_tokenizer(self, pipe):
        return self.region_tokenizer(pipe)

    # --- training ---------------------------------------------------------------------
    def latent_normalization(self, pipe):
        return pipe.vae.config.get("shift_factor") or 0.0, pipe.vae.config.scaling_factor

    def objective(self, pipe, source, config):
        return flow_objective(pipe, source, config.batch_size)

    # --- sampling ---------------------------------------------------------------------
    def native_side(self, pipe) -> int:  # ZImagePipeline's default size
        return self.resolution

    def sampling_arguments(self, pipe, config) -> dict:
        return {"max_sequence_length": max_text_tokens(pipe)}

    def guidance_in_batch(self, guidance: float) -> bool:  # ZImagePipeline guides at any scale above 0
        return guidance > 0

    def batch_layout(self, guided: bool) -> tuple[bool, ...]:  # the pipeline batches [conditional, unconditional]
        return (True, False) if guided else (True,)

    def lag_processor(self):
        from persres.families.zimage_attention import ZImageLagProcessor

        return ZImageLagProcessor

    # --- files ------------------------------------------------------------------------
    def kohya_key(self, block: str, blocks) -> str:  # musubi-tuner / ai-toolkit: the diffusers path, underscored
        return "lora_unet_" + f"{block}.{PROJECTION}".replace(".", "_")

    def kohya_layer_names(self, paths, blocks) -> dict[str, tuple[str, ...]]:
        """The diffusers paths underscored (musubi-tuner, ai-toolkit; OneTrainer's lora_transformer_ too), and the original layout's names:
        `attention_out` for to_out.0, `attention_qkv` for q, k and v fused (their rows in order)."""
        paths = set(paths)
        out = {prefix + p.replace(".", "_"): (p,) for p in paths for prefix in ("lora_unet_", "lora_transformer_")}
        for p in paths:
            if p.endswith(".attention.to_out.0"):
                out["lora_unet_" + p.removesuffix(".to_out.0").replace(".", "_") + "_out"] = (p,)
            if p.endswith(".attention.to_q"):
                qkv = tuple(p.removesuffix("q") + x for x in "qkv")
                if all(t in paths for t in qkv):
                    out["lora_unet_" + p.removesuffix(".to_q").replace(".", "_") + "_qkv"] = qkv
        return out


ZIMAGE = ZImage("zimage", "Z-Image", "ZImagePipeline", "Tongyi-MAI/Z-Image-Turbo", "zimage", "z-image-turbo", 1024,
                guidance=0.0, steps=8, train_defaults={"rank_ratio": ZIMAGE_RANK_RATIO}, denoiser_folder="transformer",
                projection=PROJECTION, image_first=True, implementation="https://github.com/Tongyi-MAI/Z-Image",
                suggests_class=False, sequence_encoders=())


def max_text_tokens(pipe) -> int:
    """The templated prompt's length limit: the tokenizer's, at most the pipeline's 512."""
    return min(MAX_TEXT_TOKENS, pipe.tokenizer.model_max_length)


def flow_objective(pipe, source, batch_size: int):
    """`loss(generator)`: one batch's flow-matching loss over `source` (a `persres.train.CachedBatchSource`
    of this pipeline: everything computed once), the transformer called as the pipeline calls it."""
    import torch

    from persres.errors import InputError
    from persres.families.flux import image_shift, shifted_sigmas

    transformer, scheduler = pipe.transformer, pipe.scheduler
    device, dtype = transformer.device, transformer.dtype
    h, w = source.mean.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"Z-Image patches latents 2x2: the training resolution must be a multiple of {2 * pipe.vae_scale_factor} px")
    mu = image_shift(scheduler, (h // 2) * (w // 2))

    def loss(generator):
        batch = source.sample(batch_size, generator)
        x0 = batch.latents  # (B, C, h, w)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        u = torch.rand((batch_size,), generator=generator, device=device)
        sigma = shifted_sigmas(scheduler, u, mu).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = ((1 - sigma) * x0 + sigma * noise).to(dtype)
        out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1 - sigma.flatten()).to(dtype), list(batch.embedding.unbind(0)),
                          return_dict=False)[0]
        pred = torch.stack(out).squeeze(2)  # (B, C, h, w): x0 - ε
        err = (pred.float() - (x0 - noise)) ** 2
        if batch.mask is None:
            return err.mean()
        return (err * batch.mask).sum() / (batch.mask.sum() * err.shape[1])

    return loss
