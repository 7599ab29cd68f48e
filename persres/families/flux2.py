"""FLUX.2: one transformer (`Flux2Transformer2DModel`: double-stream blocks, then single-stream
"parallel" blocks), trained by flow matching, in two pipelines:

- `flux2klein`: `Flux2KleinPipeline` (FLUX.2 [klein] 4B / 9B), a Qwen3 text encoder, true
  classifier-free guidance: the conditional and the unconditional (empty) prompt are two
  evaluations of each step, inside `cache_context("cond")` / `("uncond")`. Its defaults are the
  base models' (50 steps, guidance 4); the step-distilled ones' (`is_distilled`) 4 steps, no guidance.
- `flux2`: `Flux2Pipeline` (FLUX.2 [dev]), a Mistral Small 3 text encoder behind a system message,
  guidance an input of the (guidance-distilled) transformer: one evaluation a step.

- residuals: ΔW = A·B on each single-stream block's `attn.to_out`, the fused attention + MLP output
  projection (inner + MLP width -> dim: 24576 -> 6144 on dev, 12288 -> 3072 on klein 4B; Black Forest
  Labs' `single_blocks.N.linear2`). It writes each block's result back into the residual stream, as
  FLUX.1's single-block proj_out and the paper's proj_out do.
- rank: r = m / 192 on dev (32: 47,185,920 parameters, 0.146% of its 32.2 B transformer) and r = m / 160
  on klein (19 on 4B: 5,836,800, 0.151%; 26 on 9B: 12,779,520, 0.141%), the paper's share of SD v1.4's
  UNet, 0.144% (tests/test_flux2.py counts them on the real configs on the meta device).
- text: the pipeline's own encoding (its chat template, padded to the sequence length, the
  encoder's hidden states of three layers stacked per token). LAG's positions are read off the same
  templated sequence (`TemplatedTokens`): klein's Qwen3 chat frame (thinking off), dev's system message.
- LAG on the single-stream joint attention over [T text, N image] tokens (`Flux2LagProcessor`): a
  concept's map is the image queries' attention to its text columns, from the fused kernel's
  log-sum-exp; `attn.to_out` sees the whole joint sequence and the mask is 0 on text, so the residual
  acts on image tokens only. No evaluation is added.
- training: flow matching on the references' latents as the pipeline makes them: 2x2 patches stacked as
  channels, normalized by the VAE's batch-norm statistics, tokens row by row; σ ~ U(0, 1) shifted with
  the pipeline's own μ (`compute_empirical_mu` for the image's token count and the default step count),
  at timestep σ, with the guidance input dev's pipeline passes (4.0) and none on klein.
"""

from __future__ import annotations

from dataclasses import dataclass

from persres.families.base import Conditioning, FlowTransformer, named_evaluations

SINGLE_BLOCKS = "single_transformer_blocks"
PROJECTION = "attn.to_out"
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.", "context_embedder")
CHECKPOINT_KEY = "single_stream_modulation.lin.weight"  # Black Forest Labs' layout (FLUX.1's has no such key)
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # dev's guidance input; klein has none
MAX_TEXT_TOKENS = 512  # what both pipelines pad the prompt to
DEV_GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale: the guidance input training passes
_D, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
# Black Forest Labs' FLUX.2 layer names (what musubi-tuner / sd-scripts underscore after lora_unet_, and
# ai-toolkit writes after diffusion_model.) -> the diffusers layers they change (fused ones split by rows)
BFL_LAYERS = (
    ("double_blocks.{i}.img_attn.qkv", tuple(_D + f"attn.to_{x}" for x in "qkv")),
    ("double_blocks.{i}.img_attn.proj", (_D + "attn.to_out.0",)),
    ("double_blocks.{i}.img_mlp.0", (_D + "ff.linear_in",)),
    ("double_blocks.{i}.img_mlp.2", (_D + "ff.linear_out",)),
    ("double_blocks.{i}.txt_attn.qkv", tuple(_D + f"attn.add_{x}_proj" for x in "qkv")),
    ("double_blocks.{i}.txt_attn.proj", (_D + "attn.to_add_out",)),
    ("double_blocks.{i}.txt_mlp.0", (_D + "ff_context.linear_in",)),
    ("double_blocks.{i}.txt_mlp.2", (_D + "ff_context.linear_out",)),
    ("single_blocks.{i}.linear1", (_S + "attn.to_qkv_mlp_proj",)),
    ("single_blocks.{i}.linear2", (_S + "attn.to_out",)),
    ("img_in", ("x_embedder",)), ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    ("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    ("final_layer.linear", ("proj_out",)),
)


@dataclass(frozen=True, eq=False, repr=False)
class Flux2(FlowTransformer):
    """What both FLUX.2 pipelines answer alike; `Flux2Klein` and `Flux2Dev` tell guidance and text apart."""

    embedded_guidance: bool = False  # guidance is an input of the transformer (dev), not a second evaluation

    def matches_config(self, config) -> bool:
        return config.get("timestep_guidance_channels") is not None \
            and bool(config.get("guidance_embeds", True)) == self.embedded_guidance

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return any(k.endswith(CHECKPOINT_KEY) for k in keys) and any(k.endswith(GUIDANCE_KEY) for k in keys) == self.embedded_guidance

    # --- loading ----------------------------------------------------------------------
    def pipeline_class(self):
        import diffusers

        cls = getattr(diffusers, self.pipeline, None)
        if cls is None:
            from persres.errors import InputError

            raise InputError(f"{self.label} needs a diffusers release with {self.pipeline}: pip install -U diffusers")
        return cls, {}

    def load_single_file(self, path: str, config: str | None, dtype_kwargs: dict):
        """A FLUX.2 single file is its transformer in Black Forest Labs' layout (flux2-dev.safetensors,
        flux-2-klein-4b.safetensors: what ComfyUI loads as a diffusion model); diffusers converts it, and
        the rest of the pipeline comes from the configs directory or the family's cached repo."""
        from diffusers import Flux2Transformer2DModel

        cls, _ = self.pipeline_class()
        source = config or self.config_repo
        transformer = Flux2Transformer2DModel.from_single_file(path, config=source, subfolder="transformer",
                                                               local_files_only=True, **dtype_kwargs)
        return cls.from_pretrained(source, transformer=transformer, local_files_only=True, **dtype_kwargs)

    def blocks(self, model) -> dict:
        return {f"{SINGLE_BLOCKS}.{i}": block for i, block in enumerate(getattr(model, SINGLE_BLOCKS))}

    def block_names_in(self, keys) -> set[str]:
        suffix = f".{PROJECTION}.weight"
        return {b for b in (k.removesuffix(suffix) for k in keys if k.endswith(suffix)) if b.startswith(SINGLE_BLOCKS + ".")}

    def reads_text(self, path: str) -> bool:  # the double-stream blocks' text stream and the text projection
        return any(part in path for part in TEXT_STREAM)

    # --- text -------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        model = pipe.transformer
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=model.device, max_sequence_length=self.text_length(pipe))
        return Conditioning(embeds.to(model.dtype))  # (1, T, 3 D): the templated prompt, padded

    def region_tokenizer(self, pipe):
        from persres.families.templated import TemplatedTokens

        return TemplatedTokens(self.text_tokenizer(pipe), self.text_length(pipe), self.frame(pipe))

    def identifier_tokenizer(self, pipe):
        return self.region_tokenizer(pipe)

    def text_tokenizer(self, pipe):
        """The text tokenizer: the pipeline's own, or inside its processor (dev's PixtralProcessor)."""
        return getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)

    def text_length(self, pipe) -> int:
        """The templated prompt's length: the pipelines' 512, at most the text tokenizer's limit."""
        return min(MAX_TEXT_TOKENS, self.text_tokenizer(pipe).model_max_length)

    def frame(self, pipe):
        """`frame(prompt)`: the text the pipeline tokenizes for a prompt."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------
    def latent_normalization(self, pipe):
        return 0.0, 1.0  # normalized after patching, per patch channel (`latent_tokens`), as the pipeline does

    def objective(self, pipe, source, config):
        import torch

        from persres.families.flux import packed_flow_objective

        transformer = pipe.transformer
        device, dtype = transformer.device, transformer.dtype
        h, w = source.mean.shape[-2:]
        text_ids = pipe._prepare_text_ids(source.condition.embedding).to(device)  # (1, T, 4)
        image_ids = pipe._prepare_latent_ids(torch.empty(1, 1, h // 2, w // 2)).to(device)  # (1, L, 4)
        guidance = torch.full((config.batch_size,), DEV_GUIDANCE, device=device) if self.embedded_guidance else None

        def velocity(noisy, sigma, batch):
            b = noisy.shape[0]
            return transformer(hidden_states=noisy.to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                               encoder_hidden_states=batch.embedding, txt_ids=text_ids.expand(b, -1, -1),
                               img_ids=image_ids.expand(b, -1, -1), return_dict=False)[0]

        def shift(scheduler, tokens: int) -> float | None:  # the μ the pipeline passes, at the default step count
            from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

            return compute_empirical_mu(tokens, self.steps) if scheduler.config.get("use_dynamic_shifting", False) else None

        return packed_flow_objective(pipe, source, config.batch_size, self.label, velocity,
                                     tokens=lambda latents: latent_tokens(pipe, latents), shift=shift)

    # --- sampling ---------------------------------------------------------------------
    def native_side(self, pipe) -> int:  # the pipeline's default (1024 px)
        return pipe.default_sample_size * pipe.vae_scale_factor

    def sampling_arguments(self, pipe, config) -> dict:
        return {"max_sequence_length": self.text_length(pipe)}

    def guidance_in_batch(self, guidance: float) -> bool:  # guidance is an input, or a second evaluation: never a batch
        return False

    def lag_processor(self):
        from persres.families.flux2_attention import Flux2LagProcessor

        return Flux2LagProcessor

    # --- files ------------------------------------------------------------------------
    def kohya_key(self, block: str, blocks) -> str:  # musubi-tuner's name: BFL's single_blocks.N.linear2
        return f"lora_unet_single_blocks_{block.removeprefix(SINGLE_BLOCKS + '.')}_linear2"

    def kohya_layer_names(self, paths, blocks) -> dict[str, tuple[str, ...]]:
        """Black Forest Labs' names underscored after lora_unet_ (musubi-tuner, sd-scripts) and dotted after
        diffusion_model. (ai-toolkit), and the diffusers layout underscored after lora_transformer_ (OneTrainer)."""
        from persres.families.flux import original_layer_names

        out = {"lora_transformer_" + p.replace(".", "_"): (p,) for p in paths}
        for name, targets in original_layer_names(BFL_LAYERS, paths).items():
            out["lora_unet_" + name.replace(".", "_")] = targets
            out["diffusion_model." + name] = targets
        return out

    def kohya_layer_key(self, path: str, blocks) -> str:
        """BFL's name where one layer is one of BFL's (what diffusers' FLUX.2 kohya reader takes), else
        the diffusers path underscored after lora_transformer_."""
        from persres.families.flux import original_layer_names

        names = {targets: name for name, targets in original_layer_names(BFL_LAYERS, [path]).items()}
        name = names.get((path,))
        return "lora_unet_" + name.replace(".", "_") if name else "lora_transformer_" + path.replace(".", "_")


@dataclass(frozen=True, eq=False, repr=False)
class Flux2Klein(Flux2):
    def frame(self, pipe):
        from persres.families.templated import chat_frame

        return chat_frame(pipe.tokenizer, thinking=False)  # what Flux2KleinPipeline passes

    def evaluations(self, model, session):
        return named_evaluations(model, session)

    def sampling_defaults(self, pipeline_config: dict | None) -> dict:
        """The step-distilled klein models (model_index.json's `is_distilled`) sample in 4 steps without
        guidance, as Black Forest Labs' model cards and the pipeline's example run them."""
        if (pipeline_config or {}).get("is_distilled"):
            return {"guidance": 1.0, "steps": 4}
        return super().sampling_defaults(pipeline_config)


@dataclass(frozen=True, eq=False, repr=False)
class Flux2Dev(Flux2):
    def frame(self, pipe):
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        def framed(prompt: str) -> str:  # the system message and the prompt, as Flux2Pipeline frames them
            [messages] = format_input(prompts=[prompt], system_message=pipe.system_message)
            return pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

        return framed


FLUX2_KLEIN = Flux2Klein("flux2klein", "FLUX.2 klein", "Flux2KleinPipeline", "black-forest-labs/FLUX.2-klein-base-4B", "flux2_klein",
                         "flux-2-klein", 1024, guidance=4.0, steps=50, train_defaults={"rank_ratio": 1 / 160},
                         denoiser_folder="transformer", projection=PROJECTION, implementation="https://github.com/black-forest-labs/flux2",
                         suggests_class=False, sequence_encoders=())
FLUX2_DEV = Flux2Dev("flux2", "FLUX.2 dev", "Flux2Pipeline", "black-forest-labs/FLUX.2-dev", "flux2", "flux-2-dev", 1024,
                     guidance=DEV_GUIDANCE, steps=50, train_defaults={"rank_ratio": 1 / 192}, denoiser_folder="transformer",
                     projection=PROJECTION, implementation="https://github.com/black-forest-labs/flux2", suggests_class=False,
                     sequence_encoders=(), embedded_guidance=True)


def latent_tokens(pipe, latents):
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens as the pipeline makes them: 2x2 patches stacked as
    channels, normalized by the VAE's batch-norm statistics per patch channel, row by row."""
    import torch

    patches = pipe._patchify_latents(latents)  # (B, 4C, h/2, w/2)
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(patches)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(patches)
    return pipe._pack_latents((patches - mean) / std)
