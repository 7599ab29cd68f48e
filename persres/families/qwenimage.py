"""Qwen-Image: `QwenImagePipeline`, a double-stream diffusion transformer (`QwenImageTransformer2DModel`,
60 blocks) with a Qwen2.5-VL text encoder, trained by flow matching and sampled with true
classifier-free guidance.

- residuals: ΔW = A·B on each block's image-stream attention output projection
  `transformer_blocks.N.attn.to_out.0` (3072 -> 3072). A block's joint attention over text and
  image tokens is where the prompt reaches the image, and `to_out.0` writes that attention's
  image half into the image stream, as the paper's proj_out writes its transformer's result back
  into the UNet. The text stream's `to_add_out` stays as it is.
- rank: r = m / 38.4 = 80 gives 29,491,200 parameters, 0.144% of the transformer, the share the
  paper's 1,239,040 are of SD v1.4's UNet (tests/test_qwenimage.py counts both on the meta device).
- text: the pipeline's own encoding: the prompt inside its system-message template
  (`prompt_template_encode`), the encoder's last hidden states with the template's first
  `prompt_template_encode_start_idx` (34) tokens dropped. LAG's token positions are read off the
  same templated sequence after the drop (`TemplatedTokens`).
- LAG: each block attends over [T text tokens, N image tokens]; a concept's map is the image
  queries' attention to its text columns, from the fused kernel's log-sum-exp; `to_out.0` sees
  the N image tokens only, so the residual never reaches text. True CFG runs the conditional and
  the unconditional prompt as two evaluations of each step, inside `cache_context("cond")` and
  `("uncond")`: the session is told which is which (`named_evaluations`), the conditional one
  finds the regions, and the unconditional one uses them. No evaluation is added.
- training: flow matching on the references' latents, normalized per channel by the VAE's
  `latents_mean` / `latents_std` and packed in 2x2 patches as the pipeline packs them; σ ~ U(0, 1)
  shifted as the pipeline's scheduler shifts its sigmas for the image's token count, at
  timestep σ; the transformer predicts the velocity ε - x0.
"""

from __future__ import annotations

from dataclasses import dataclass

from persres.families.base import Conditioning, FlowTransformer, named_evaluations

QWEN_RANK_RATIO = 1 / 38.4  # r = m / 38.4 = 80: the paper's share of the model's parameters (see the module doc)
BLOCKS = "transformer_blocks"
PROJECTION = "attn.to_out.0"
TEXT_PARTS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp.", "txt_in", "txt_norm")
CHECKPOINT_KEYS = ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")  # its single files keep diffusers' names
NEGATIVE_PROMPT = " "  # what QwenImagePipeline's documentation passes where no negative prompt is wanted


@dataclass(frozen=True, eq=False, repr=False)
class QwenImage(FlowTransformer):
    def matches_config(self, config) -> bool:
        return config.get("axes_dims_rope") is not None and config.get("joint_attention_dim") is not None \
            and config.get("num_single_layers") is None

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return all(any(k.endswith(name) for k in keys) for name in CHECKPOINT_KEYS)

    # --- loading ----------------------------------------------------------------------
    def pipeline_class(self):
        try:
            from diffusers import QwenImagePipeline
        except ImportError:
            from persres.errors import InputError

            raise InputError("Qwen-Image needs a diffusers release with QwenImagePipeline: pip install -U diffusers") from None
        return QwenImagePipeline, {}

    def load_single_file(self, path: str, config: str | None, dtype_kwargs: dict):
        """A Qwen-Image single file is its transformer, in diffusers' names (qwen_image_bf16.safetensors, what
        ComfyUI loads as a diffusion model); the rest of the pipeline comes from the configs directory or
        the cached Qwen/Qwen-Image repo."""
        cls, _ = self.pipeline_class()
        from diffusers import QwenImageTransformer2DModel

        source = config or self.config_repo
        transformer = QwenImageTransformer2DModel.from_single_file(path, config=source, subfolder="transformer",
                                                                   local_files_only=True, **dtype_kwargs)
        return cls.from_pretrained(source, transformer=transformer, local_files_only=True, **dtype_kwargs)

    def blocks(self, model) -> dict:
        return {f"{BLOCKS}.{i}": block for i, block in enumerate(getattr(model, BLOCKS))}

    def block_names_in(self, keys) -> set[str]:
        suffix = f".{PROJECTION}.weight"
        return {b for b in (k.removesuffix(suffix) for k in keys if k.endswith(suffix)) if b.startswith(BLOCKS + ".")}

    def reads_text(self, path: str) -> bool:  # the text stream of every block, and the text projection
        return any(part in path for part in TEXT_PARTS)

    # --- text -------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        model = pipe.transformer
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=model.device, max_sequence_length=max_text_tokens(pipe))
        return Conditioning(embeds.to(model.dtype))  # (1, T, D): the prompt's tokens after the template's prefix

    def region_tokenizer(self, pipe):
        from persres.families.templated import TemplatedTokens

        return TemplatedTokens(pipe.tokenizer, max_text_tokens(pipe), pipe.prompt_template_encode.format,
                               drop=pipe.prompt_template_encode_start_idx)

    def identifier_tokenizer(self, pipe):
        return self.region_tokenizer(pipe)

    # --- training ---------------------------------------------------------------------
    def latent_distribution(self, pipe, pixels):  # a video VAE: the images are one-frame clips
        dist = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]  # (N, C, h, w) each

    def latent_normalization(self, pipe):
        import torch

        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean, device=pipe.vae.device).view(-1, 1, 1)  # (C, 1, 1)
        return mean, 1 / torch.tensor(config.latents_std, device=pipe.vae.device).view(-1, 1, 1)

    def objective(self, pipe, source, config):
        from persres.families.flux import packed_flow_objective

        transformer = pipe.transformer
        h, w = source.mean.shape[-2:]
        shapes = [[(1, h // 2, w // 2)]] * config.batch_size

        def velocity(noisy, sigma, batch):
            return transformer(hidden_states=noisy.to(transformer.dtype), timestep=sigma.to(transformer.dtype),
                               encoder_hidden_states=batch.embedding, img_shapes=shapes, return_dict=False)[0]

        return packed_flow_objective(pipe, source, config.batch_size, self.label, velocity)

    # --- sampling ---------------------------------------------------------------------
    def native_side(self, pipe) -> int:  # the pipeline's default (1024 px)
        return pipe.default_sample_size * pipe.vae_scale_factor

    def sampling_arguments(self, pipe, config) -> dict:
        """Guidance is true CFG (`true_cfg_scale`, against a blank negative prompt); the transformer has no
        guidance input."""
        guided = config.guidance > 1
        return {"max_sequence_length": max_text_tokens(pipe), "guidance_scale": None, "true_cfg_scale": config.guidance,
                "negative_prompt": NEGATIVE_PROMPT if guided else None}

    def guidance_in_batch(self, guidance: float) -> bool:  # the two prompts are two evaluations, never one batch
        return False

    def evaluations(self, model, session):
        return named_evaluations(model, session)

    def lag_processor(self):
        from persres.families.qwenimage_attention import QwenLagProcessor

        return QwenLagProcessor

    # --- files ------------------------------------------------------------------------
    def kohya_key(self, block: str, blocks) -> str:  # musubi-tuner / ai-toolkit: the diffusers path, underscored
        return "lora_unet_" + f"{block}.{PROJECTION}".replace(".", "_")

    def kohya_layer_names(self, paths, blocks) -> dict[str, tuple[str, ...]]:
        """The diffusers paths underscored: lora_unet_ (musubi-tuner, ai-toolkit) and lora_transformer_ (OneTrainer)."""
        return {prefix + p.replace(".", "_"): (p,) for p in paths for prefix in ("lora_unet_", "lora_transformer_")}


QWEN_IMAGE = QwenImage("qwenimage", "Qwen-Image", "QwenImagePipeline", "Qwen/Qwen-Image", "qwen_image", "qwen-image", 1024,
                       guidance=4.0, steps=50, train_defaults={"rank_ratio": QWEN_RANK_RATIO}, denoiser_folder="transformer",
                       projection=PROJECTION, implementation="https://github.com/QwenLM/Qwen-Image", suggests_class=False,
                       sequence_encoders=())


def max_text_tokens(pipe) -> int:
    """The prompt's length limit after the template's prefix: the pipeline's `tokenizer_max_length` (1024)."""
    return pipe.tokenizer_max_length
