"""`Family`: what every model-family adapter answers (see `persres.families`).

The fields are data a family states (names, defaults, where diffusers keeps its configs);
the methods are what differs in behaviour. Methods import torch and diffusers when called,
so the registry can name a family without a model library.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Conditioning:
    """A prompt's conditioning for the denoiser, computed once."""

    embedding: "torch.Tensor"  # (1, tokens, D); FLUX.1: the T5 states
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (1, P), time_ids (1, 6); FLUX.1: pooled_projections (1, P)

    def expand(self, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        added = None if self.added is None else {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()}
        return self.embedding.expand(batch, -1, -1), added


@dataclass(frozen=True, eq=False, repr=False)
class Family:
    key: str  # what packs and the registry record
    label: str  # what messages say
    pipeline: str  # the diffusers pipeline class in model_index.json
    config_repo: str  # where diffusers' from_single_file reads this family's configs
    kohya_version: str  # sd-scripts' ss_base_model_version
    modelspec: str  # SAI model spec architecture (LoRAs append "/lora")
    resolution: int  # native training resolution, for exported metadata
    guidance: float = 6.0  # sampling guidance (paper, Sec. 4: 6.0)
    steps: int = 50  # sampling steps (paper, Sec. 4: 50)
    train_defaults: dict = field(default_factory=dict)  # training settings the family recommends over the paper's
    projection: str = "proj_out"  # where a block keeps the output projection that carries the residual
    image_first: bool = False  # a joint sequence holds [N image, T text] tokens, not [T text, N image]
    denoiser_folder: str = "unet"  # the denoiser's subfolder in a diffusers directory, and its prefix in diffusers LoRA files
    implementation: str = "diffusers"  # modelspec.implementation of exported LoRAs
    suggests_class: bool = True  # whether class-word suggestion (the UNet's denoising error) runs on it
    kohya_v2: bool = False  # sd-scripts' ss_v2
    v_modelspec: str | None = None  # the model spec architecture of its v-prediction models, where it has its own
    # kohya's prefix for each text encoder's layers, the first of a component's is the one written
    kohya_text_prefixes: tuple[tuple[str, str], ...] = (("text_encoder", "lora_te_"), ("text_encoder", "lora_te1_"))
    # (text encoder, its tokenizer) whose per-token states the denoiser reads at the region tokenizer's positions
    sequence_encoders: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"),)
    # ComfyUI's model configs of this family (`comfy.supported_models` class names) its nodes take
    comfyui_models: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<family {self.key}>"

    # --- detection (no torch) ---------------------------------------------------------
    def matches_config(self, denoiser_config) -> bool:
        raise NotImplementedError

    def matches_checkpoint(self, keys: list[str]) -> bool:
        """An original-layout single file of this family, by its tensor names."""
        raise NotImplementedError

    def matches_legacy_pack(self, meta) -> bool:
        """A pack written before packs recorded their family (only SD 1.x/2.x/XL packs are that old)."""
        return False

    def denoiser_config_of(self, read_json) -> dict | None:
        """This family's denoiser config from `read_json(relative path)` of a model directory, if it is one."""
        config = read_json(f"{self.denoiser_folder}/config.json")
        return config if config is not None and self.matches_config(config) else None

    # --- loading ----------------------------------------------------------------------
    def pipeline_class(self):
        """(diffusers pipeline class, its from_pretrained options)."""
        raise NotImplementedError

    def load_single_file(self, path: str, config: str | None, dtype_kwargs: dict):
        cls, kwargs = self.pipeline_class()
        return cls.from_single_file(path, config=config, local_files_only=True, **dtype_kwargs, **kwargs)

    def prepare(self, pipe) -> None:
        """Set up a freshly loaded pipeline the way persres samples it (scheduler, ...)."""

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_folder)

    def blocks(self, model) -> dict:
        """{name: block} of every block whose output projection carries a residual."""
        raise NotImplementedError

    def block_names_in(self, keys) -> set[str]:
        """The residual-carrying blocks named by a denoiser state dict's keys (read without loading)."""
        raise NotImplementedError

    def reads_text(self, path: str) -> bool:
        """Whether a denoiser layer acts on the prompt's tokens rather than image positions."""
        return False

    # --- text -------------------------------------------------------------------------
    def encode(self, pipe, prompt: str, resolution: tuple[int, int]):
        """The prompt's `persres.conditioning.Conditioning` (the pipeline's own encoders), no guidance."""
        raise NotImplementedError

    def region_tokenizer(self, pipe):
        """The tokenizer whose positions the denoiser's attention maps are read by."""
        return pipe.tokenizer

    def identifier_tokenizer(self, pipe):
        """The tokenizer in which a concept's identifier must be one token."""
        return pipe.tokenizer

    def check_training_prompt(self, pipe, prompt: str, identifier: str, class_word: str) -> None:
        """PromptError unless the concept's tokens are inside every encoder's limit."""
        from persres.tokens import concept_positions

        concept_positions(self.identifier_tokenizer(pipe), prompt, identifier, class_word)

    def check_concept_prompt(self, pipe, prompt: str) -> None:
        """PromptError for a prompt whose concept positions cannot be read (SDXL's two tokenizers)."""

    # --- training ---------------------------------------------------------------------
    def view_cell(self, pipe) -> int:
        """Pixels per latent position the denoiser sees (zoom-out views are placed on this grid)."""
        return pipe.vae_scale_factor

    def latent_distribution(self, pipe, pixels):
        """The VAE's latent distribution of `pixels` (N, 3, H, W) in [-1, 1]: (mean, std), each (N, C, h, w)."""
        dist = pipe.vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def latent_normalization(self, pipe):
        """(shift, scale): the denoiser sees (z - shift) * scale, each a float or per channel (C, 1, 1)."""
        return 0.0, pipe.vae.config.scaling_factor

    def check_train_config(self, config) -> None:
        """InputError for a training setting this family cannot use."""

    def objective(self, pipe, source, config):
        """`loss(generator)`: one batch's training loss over a `persres.train.CachedBatchSource`."""
        raise NotImplementedError

    def prediction_type(self, pipe) -> str:
        """What the denoiser predicts, as packs record it."""
        return pipe.scheduler.config.get("prediction_type", "epsilon")

    # --- sampling ---------------------------------------------------------------------
    def native_side(self, pipe) -> int:
        raise NotImplementedError

    def sampling_arguments(self, pipe, config) -> dict:
        """The pipeline call's family-specific arguments."""
        return {}

    def sampling_defaults(self, pipeline_config: dict | None) -> dict:
        """Guidance and steps to sample with where none are given, for a pipeline whose config
        (model_index.json; None where it cannot be read) is `pipeline_config`."""
        return {"guidance": self.guidance, "steps": self.steps}

    def guidance_in_batch(self, guidance: float) -> bool:
        """Whether the denoiser's batch is [unconditional, conditional] (classifier-free guidance)."""
        return guidance > 1

    def batch_layout(self, guided: bool) -> tuple[bool, ...]:
        """The denoiser batch's chunks, True where conditional: [unconditional, conditional] under guidance."""
        return (False, True) if guided else (True,)

    def lag_processors(self, model, session, backend, layers, latent_hw):
        """`make(processor name, old processor)` for `kernels.attention_processors`: token maps for `session`."""
        raise NotImplementedError

    @contextmanager
    def evaluations(self, model, session):
        """Tells `session` (a `persres.lag.LagSession`) when each denoiser evaluation starts. One evaluation
        per step holds every chunk of the batch (`batch_layout`), so each call of the model starts one."""
        hook = model.register_forward_pre_hook(lambda module, args: session.begin_evaluation())
        try:
            yield
        finally:
            hook.remove()

    def plain_attention(self, model, backend):
        """A context manager that runs the denoiser's attention on `backend` without LAG."""
        raise NotImplementedError

    # --- memory, class words, files ---------------------------------------------------
    def needed_bytes(self, pipe, height: int, width: int, samples: int, training: bool) -> int:
        """~ activation bytes of one denoiser pass; 0 where no estimate is fitted (no refusal)."""
        return 0

    def check_suggestion(self) -> None:
        from persres.errors import InputError

        if not self.suggests_class:
            raise InputError(f"class-word suggestion runs on SD 1.x, 2.x and SDXL models; on {self.label} give the class "
                             f"word (--class WORD)")

    def kohya_key(self, block: str, blocks) -> str:
        """A block's proj_out in kohya / sd-scripts files (`blocks`: all of the pack's)."""
        raise NotImplementedError

    def kohya_keys(self, block: str, blocks) -> set[str]:
        """Every name a kohya file may give a block's proj_out (what import accepts)."""
        return {self.kohya_key(block, blocks)}

    def kohya_layer_names(self, paths, blocks) -> dict[str, tuple[str, ...]]:
        """Every name kohya files give the denoiser's layers (`paths`): name -> the layer path(s) it
        changes, several where the original model fuses them (their rows in order); `blocks`: the
        residual-carrying blocks' names."""
        return {"lora_unet_" + p.replace(".", "_"): (p,) for p in paths}

    def kohya_layer_key(self, path: str, blocks) -> str:
        """The name a kohya export gives a denoiser layer."""
        return "lora_unet_" + path.replace(".", "_")

    def export_modelspec(self, prediction: str) -> str:
        return self.v_modelspec if prediction == "v_prediction" and self.v_modelspec else self.modelspec


@dataclass(frozen=True, eq=False, repr=False)
class FlowTransformer(Family):
    """A diffusion transformer trained by flow matching on 2x2 patches of its latents (FLUX.1, Z-Image,
    Qwen-Image): what such families answer alike."""

    def view_cell(self, pipe) -> int:  # latents are patched 2x2: views cover whole patches
        return pipe.vae_scale_factor * 2

    def check_train_config(self, config) -> None:
        from persres.errors import InputError

        if config.snr_gamma is not None:
            raise InputError(f"min-SNR weighting (--snr-gamma) is for epsilon and v-prediction models; {self.label} trains by flow matching")

    def prediction_type(self, pipe) -> str:
        return "flow_matching"

    def plain_attention(self, model, backend):
        return diffusers_attention(self, backend)

    def lag_processor(self):
        """The attention processor class that hands a block's token maps to LAG, made as
        `(backend, session, block, image tokens)`."""
        raise NotImplementedError

    def lag_processors(self, model, session, backend, layers, latent_hw):
        processor, image_tokens = self.lag_processor(), latent_hw[0] * latent_hw[1]  # `latent_hw`: the 2x2-patch grid

        def make(name: str, old):  # persres's processor where a block carries residuals, diffusers' own elsewhere
            block = name.rsplit(".", 2)[0]  # "<block>.<attention module>.processor"
            return processor(backend, session, block, image_tokens) if block in layers else old

        return make


@contextmanager
def diffusers_attention(family: Family, backend):
    """A transformer family's attention without LAG: diffusers' own processors; a backend other than
    SDPA is refused rather than ignored (persres's backends run its LAG processors)."""
    from persres.errors import InputError
    from persres.kernels import Backend

    if backend not in (None, "auto", "sdpa", Backend.SDPA):
        raise InputError(f"--backend {backend} runs {family.label}'s attention with --lag only; without it diffusers' own runs")
    yield


HOOK = "persres_evaluations"  # the name of persres's hook in a diffusers model's HookRegistry


@contextmanager
def named_evaluations(model, session):
    """`Family.evaluations` for pipelines that run the conditional and the unconditional prompt as two
    evaluations of one step (diffusers' true classifier-free guidance), each inside
    `model.cache_context("cond")` / `("uncond")`: a stateful diffusers hook reads the context each
    evaluation runs in and tells `session` its chunk (conditional or not) and its step. An evaluation
    outside any context is a step of its own, with the layout `session` already holds."""
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class Announcer(ModelHook):
        _is_stateful = True  # `cache_context` hands the context to stateful hooks' StateManagers

        def __init__(self):
            super().__init__()
            self.context = StateManager(BaseState)
            self.step = -1

        def pre_forward(self, module, *args, **kwargs):
            try:
                name = self.context.context.name
            except ValueError:  # called outside any cache_context
                name = None
            if name != "uncond":  # the conditional evaluation opens a step; the unconditional one follows in it
                self.step += 1
            session.begin_evaluation(step=self.step, layout=None if name is None else (name != "uncond",))
            return args, kwargs

        def reset_state(self, module):
            return module

    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(Announcer(), HOOK)
    try:
        yield
    finally:
        registry.remove_hook(HOOK, recurse=False)
