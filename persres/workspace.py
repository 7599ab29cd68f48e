"""`Workspace`: the registry and one resolved base model, the object persres's API hangs on.

    import persres
    ws = persres.Workspace()                       # the configured model (else the toy model)
    ws.train("photos/", name="mydog", class_word="dog")
    ws.generate("a V* dog on the beach", ["mydog"], lag=True, out_dir="out/")

The model is resolved once (argument, else $PERSRES_MODEL, else `persres config model`, else
the toy model), its configs directory and its persres_defaults.json are read once, and its
pipeline is loaded on first need and kept, with the fingerprint of the weights it was loaded
from. Everything below the workspace takes the model context from here and never asks
"which model?" again. Creating a workspace imports no torch: registry work stays instant.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from persres.config import SampleConfig, TrainConfig
from persres.errors import InputError, ModelNotFound
from persres.models import check_model_value, check_single_file_config, is_default_toy, is_single_file, resolve_model
from persres.names import check_identifier
from persres.packs import PackMeta
from persres.registry import ConceptRecord, Registry
from persres.settings import ModelDefaults, config_digest, read_defaults, settings_sources, train_config_from

DEFAULT_MODEL_KEY = "default_model"
DEFAULT_MODEL_CONFIG_KEY = "default_model_config"  # the configs directory of a single-file default model
TOY_NOTICE_KEY = "toy_notice_shown"


@dataclass(frozen=True)
class TrainOutcome:
    record: ConceptRecord | None  # None when the pack was not registered (`train(register=False)`)
    losses: list[float]
    seconds: float
    model: str
    meta: PackMeta | None = None
    tensors: dict | None = None  # the pack's tensors, when it was not registered


class Workspace:
    """A registry (PERSRES_HOME, or `home`) and one base model, resolved once.

    `pipe`: a pipeline of that model you already hold (used as is; nothing is loaded)."""

    def __init__(self, model: str | None = None, *, home: str | Path | None = None, registry: Registry | None = None,
                 model_config: str | None = None, device="auto", precision: str = "auto", pipe=None, open_registry: bool = True):
        # open_registry=False: a process that must not touch SQLite (train-many's other machines)
        if registry is None and open_registry:
            registry = Registry(None if home is None else Path(home))
        self.registry = registry
        configured = registry.setting(DEFAULT_MODEL_KEY) if registry is not None else None
        if model is not None:
            check_model_value(model)  # a bad --model is one line before any work
        elif os.environ.get("PERSRES_MODEL"):
            try:
                check_model_value(os.environ["PERSRES_MODEL"])
            except ModelNotFound as e:
                raise ModelNotFound(f"$PERSRES_MODEL: {e}") from None
        self.model = resolve_model(model, configured)
        self.toy_is_silent_default = is_default_toy(model, configured)
        if model_config or os.environ.get("PERSRES_MODEL_CONFIG"):
            self.model_config = model_config or os.environ["PERSRES_MODEL_CONFIG"]
        else:
            self.model_config = registry.setting(DEFAULT_MODEL_CONFIG_KEY) if registry is not None and self.model == configured else None
        if is_single_file(self.model):
            check_single_file_config(self.model, self.model_config)
        self.device, self.precision = device, precision
        self._pipe, self._pipe_key, self._fingerprint = pipe, None, None

    # --- the model context ---------------------------------------------------------------
    @cached_property
    def defaults(self) -> ModelDefaults:
        """The model's own recommended defaults (its persres_defaults.json), read once."""
        return read_defaults(self.model)

    @cached_property
    def unet_config(self) -> dict | None:
        """The model's UNet config where it can be read without loading (what `--precision auto`
        weighs on the CPU); a single file's from its `--config` directory."""
        from persres.models import unet_config_of

        return unet_config_of(self.model) or (unet_config_of(self.model_config) if self.model_config else None)

    @property
    def family(self):
        """The model's `families.Family`: the loaded pipeline's, else read from its files without
        loading (None where they cannot be read yet: a hub id not downloaded)."""
        from persres import families

        return families.of(self._pipe) if self._pipe is not None else self._family_from_files

    @cached_property
    def _family_from_files(self):
        from persres.models import family_of_model

        return family_of_model(self.model)

    def sample_config(self, **settings) -> SampleConfig:
        """The family's sampling defaults (guidance, steps), then `settings` (None values skipped)."""
        family = self.family
        defaults = {} if family is None else family.sampling_defaults(self._pipeline_config())
        return SampleConfig(**{**defaults, **{k: v for k, v in settings.items() if v is not None}})

    def _pipeline_config(self) -> dict | None:
        """The pipeline's config: the loaded one's, else its model_index.json read without loading."""
        from persres.models.files import pipeline_config_of

        if self._pipe is not None:
            return dict(getattr(self._pipe, "config", {}) or {})
        return pipeline_config_of(self.model) or (pipeline_config_of(self.model_config) if self.model_config else None)

    def first_toy_use(self) -> bool:
        """True once per registry: the toy model is in use only because nothing else was named."""
        if not self.toy_is_silent_default or self.registry is None or self.registry.setting(TOY_NOTICE_KEY) is not None:
            return False
        self.registry.set_setting(TOY_NOTICE_KEY, "1")
        return True

    def train_config(self, overrides: dict | None = None) -> TrainConfig:
        """Paper defaults, then this model's recommended ones, then `overrides` (None values skipped)."""
        return train_config_from(self.defaults.train, overrides or {})

    def settings_sources(self, overrides: dict | None = None) -> dict[str, str]:
        return settings_sources(self.defaults.train, overrides or {})

    def pipeline(self, device=None, precision: str | None = None, on_download=None):
        """The model's pipeline, loaded on first call and kept (loaded again only for another device or
        precision). `device` / `precision` None or "auto": the workspace's own. A hub id not yet on this
        machine is downloaded first, with the hub's progress bars, after `on_download(model)` is told."""
        from persres.models import load_pipeline, local_snapshot, pick_device, pick_dtype

        if self._pipe is not None and self._pipe_key is None:  # handed in by the caller: used as is
            return self._pipe
        device = None if device in (None, "auto") else device
        precision = None if precision in (None, "auto") else precision
        if self._pipe is not None:  # what is not asked for explicitly, the loaded pipeline already answers
            loaded_device, loaded_dtype = self._pipe_key
            dev = pick_device(device) if device is not None else loaded_device
            same_device = dev == loaded_device
            dtype = pick_dtype(precision, dev, self.unet_config) if precision is not None else loaded_dtype if same_device \
                else pick_dtype(self.precision, dev, self.unet_config)
            if (dev, dtype) == self._pipe_key:
                return self._pipe
        else:
            dev = pick_device(device or self.device)
            dtype = pick_dtype(precision or self.precision, dev, self.unet_config)
        key = (dev, dtype)
        self._pipe = None  # the old one is released before the new one loads
        self._pipe = load_pipeline(local_snapshot(self.model, on_download), key[0], key[1], self.model_config)
        self._pipe_key, self._fingerprint = key, None
        return self._pipe

    def release(self) -> None:
        """Let the loaded pipeline go (the next call that needs it loads it again)."""
        self._pipe, self._pipe_key, self._fingerprint = None, None, None

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def fingerprint(self):
        """`models.Fingerprint` of the loaded pipeline's base weights (computed once per load)."""
        from persres.families import denoiser
        from persres.models import fingerprint

        if self._fingerprint is None:
            self._fingerprint = fingerprint(denoiser(self.pipeline()))
        return self._fingerprint

    def base_weights(self) -> str:
        """The base weights' fingerprint: from the loaded pipeline, else read from the files."""
        from persres.models import base_weights

        return self.fingerprint.weights if self.loaded else base_weights(self.model, self.model_config)

    # --- concepts ------------------------------------------------------------------------
    @staticmethod
    def references(images) -> list:
        """Reference images: a folder, "toy:NAME" (a concept shipped with persres), or already read ones."""
        from persres.images import read_folder
        from persres.toy import resolve_folder

        return read_folder(resolve_folder(images)) if isinstance(images, (str, Path)) else list(images)

    def train(self, images: str | Path, name: str, class_word: str | None = "auto", *, config: TrainConfig | None = None,
              overrides: dict | None = None, progress=None, on_suggested=None, on_phase: Callable[[str], None] | None = None,
              sources: dict[str, str] | None = None, identifier: str | None = None, register: bool = True,
              force_size: bool = False, on_settings: Callable[[str], None] | None = None, on_download=None,
              **settings) -> TrainOutcome:
        """Train a concept from a folder of images (or "toy:NAME", or read `references`) and register its pack; nothing
        is registered on failure. `class_word` None or "auto": the base model suggests it first.
        `settings` (steps=100, lr=1e-3, ...) join `overrides`: TrainConfig fields over the model's defaults.

        `identifier`: the one to train with (planned ahead, as train-many plans its rows) instead of a
        fresh one; `register=False` (with an `identifier`): the pack is returned in the outcome, not
        registered (train-many's other processes write it to their shard).
        A resolution far past the model's or beyond this machine's memory is refused unless
        `force_size` (`persres.sizes`). `on_settings(line)` hears the settings line (every training
        setting, its value and where it came from) once the inputs are checked, before the model loads."""
        from persres import families
        from persres.images import warn_if_small, write_reference_sheet
        from persres.packs import training_record
        from persres.tokens import check_class_word, is_single_token

        phase = on_phase or (lambda label: None)
        if not register and identifier is None:
            raise InputError("a pack that is not registered needs its identifier planned (identifier=...)")
        if register:
            self.registry.require_writable()
            self.registry.check_new_name(name)
        auto = class_word is None or class_word == "auto"
        class_word = None if auto else check_class_word(class_word)
        given = {**(overrides or {}), **settings}
        if config is None:  # from the settings given: where each came from is known (and recorded in the pack)
            config, sources = self.train_config(given), sources or self.settings_sources(given)
        references = self.references(images)
        if on_settings is not None:
            from persres.settings import effective_settings

            on_settings(effective_settings(config, sources or self.settings_sources(given), self.unet_config))
        phase("loading the model")
        pipe = self.pipeline(config.device, config.precision, on_download=on_download)
        from persres.sizes import check_size
        from persres.train import default_resolution, train_residuals

        resolution = config.resolution or default_resolution(pipe)
        check_size(pipe, resolution, resolution, config.batch_size, training=True, force=force_size, what="the training")
        warn_if_small(references, resolution)
        class_info = None
        if auto:
            phase("suggesting the class word")
            suggestion = self.suggest_class(references, seed=config.seed)
            class_word = suggestion.best
            class_info = {"class_source": "suggested", "class_suggestions": suggestion.top(5), "class_evaluations": suggestion.evaluations}
            if on_suggested is not None:
                on_suggested(suggestion)

        def fit(ident: str) -> bool:
            return is_single_token(families.of(pipe).identifier_tokenizer(pipe), ident)

        def run(ident: str) -> TrainOutcome:
            result = train_residuals(pipe, [r.image for r in references], ident, class_word, config, progress, on_phase=phase)
            train_config = training_record(config, result.prompt, result.resolution, families.of(pipe).prediction_type(pipe),
                                           config_digest(config, self.model), sources=sources, class_info=class_info)
            meta = self.pack_meta(name, ident, class_word, result.ranks, train_config, [r.sha256 for r in references],
                                  losses=result.losses, seconds=result.seconds)
            if not register:
                return TrainOutcome(None, result.losses, result.seconds, self.model, meta, result.tensors)
            record = self.registry.add(result.tensors, meta)
            write_reference_sheet(self.registry.reference_sheet(name), [r.image for r in references])
            return TrainOutcome(record, result.losses, result.seconds, self.model, meta)

        if identifier is not None:
            if not fit(identifier):
                raise InputError(f"the planned identifier {identifier!r} is not one token of {self.model!r}'s tokenizer")
            return run(identifier)
        with self.registry.reservation(name, fits=fit) as fresh:
            return run(fresh)

    def pack_meta(self, name: str, identifier: str, class_word: str, ranks: dict[str, int], train_config: dict,
                  image_hashes: Sequence[str] = (), losses: Sequence[float] = (), seconds: float | None = None,
                  **more) -> PackMeta:
        """What a pack of this model says about itself (`packs.pack_meta_for`; `more`: layers, everywhere)."""
        from persres.packs import pack_meta_for

        return pack_meta_for(self.pipeline(), self.fingerprint, self.model, name, identifier, class_word, ranks, train_config,
                             image_hashes, losses, seconds, checkpoint=Path(self.model) if is_single_file(self.model) else None,
                             **more)

    def suggest_class(self, images, candidates: str | Sequence[str] | None = None, config=None, seed: int | None = None):
        """Rank candidate class words for reference images (a folder, "toy:NAME", or loaded references)."""
        from persres.suggest import SuggestConfig, parse_candidates, suggest

        if candidates is None:
            entries = self.defaults.class_candidates or parse_candidates(None)
        else:
            entries = parse_candidates(candidates) if isinstance(candidates, str) else list(candidates)
        references = self.references(images)
        config = config or SuggestConfig(**({} if seed is None else {"seed": seed}))
        return suggest(self.pipeline(), [r.image for r in references], entries, config)

    def import_concept(self, path: str | Path, name: str | None = None, class_word: str | None = None, identifier: str | None = None,
                       *, proj_out_only: bool = False, everywhere: bool = False) -> ConceptRecord:
        """Register a persres pack, or any LoRA (kohya, diffusers/peft, a persres export) fitted to this model.

        A persres pack keeps its own class word and identifier: `class_word` / `identifier` are
        refused for it. A foreign file's name, class word and identifier: given, else from its metadata
        (`interop.metadata.naming_of`: persres.* keys, its trigger word), else a fresh identifier.
        `everywhere`: under LAG it acts at every position (a style), not in a region."""
        from persres import families
        from persres.interop.lora import foreign_pack_tensors, lora_format
        from persres.interop.metadata import naming_of
        from persres.packs import CONFIG_KEY, check_regular_file, file_metadata, import_record
        from persres.tokens import check_class_word, is_single_token

        self.registry.require_writable()
        path = Path(path)
        check_regular_file(path)
        metadata = file_metadata(path)
        if CONFIG_KEY in metadata:
            if class_word is not None or identifier is not None:
                given = "--class" if class_word is not None else "--identifier"
                raise InputError(f"{str(path)!r} is a persres pack, which keeps its own class word and identifier: drop {given}")
            return self.registry.import_pack(path, name)
        fmt = lora_format(path)  # a file that is no LoRA persres can apply is told so before anything is asked of it
        name, class_word, identifier = naming_of(metadata, name, class_word, identifier)
        if not name or not class_word:
            missing = " and ".join(w for w, v in (("--name", name), ("--class", class_word)) if not v)
            raise InputError(f"{str(path)!r} is a LoRA file, not a persres pack: give {missing} to import it")
        self.registry.check_new_name(name)
        class_word = check_class_word(class_word)
        if identifier is not None:
            check_identifier(identifier)  # a LoRA's trigger word may span several tokens: it is what the LoRA learned
        pipe = self.pipeline()
        tokenizer = families.of(pipe).identifier_tokenizer(pipe)
        tensors, ranks, layers, fmt = foreign_pack_tensors(path, pipe, proj_out_only, fmt)
        train_config = import_record(fmt, path.name)
        more = dict(layers=layers, everywhere=everywhere or metadata.get("persres.everywhere") == "true")
        if identifier is not None:
            return self.registry.add(tensors, self.pack_meta(name, identifier, class_word, ranks, train_config, **more),
                                     allow_shared_identifier=True)
        with self.registry.reservation(name, fits=lambda ident: is_single_token(tokenizer, ident)) as fresh:
            return self.registry.add(tensors, self.pack_meta(name, fresh, class_word, ranks, train_config, **more))

    def export(self, name: str, output: str | Path, fmt: str = "persres", force: bool = False) -> Path:
        """Write a concept as its pack (`persres`, re-importable) or as a `diffusers` / `kohya` LoRA file."""
        from persres.interop import export_concept

        return export_concept(self.registry, name, output, fmt, force)

    def apply_concepts(self, names: Sequence[str]):
        """Load registered concepts onto the pipeline (checked for fit); returns them bound for prompts."""
        from persres.fitting import apply_concepts

        return apply_concepts(self.pipeline(), self.registry, names, self.model, self.fingerprint)

    def generate(self, prompt: str, concepts: Sequence[str] = (), config: SampleConfig | None = None, *, out_dir: str | Path | None = None,
                 backend: str | None = None, sheet: bool = False, on_step=None, overwrite: bool = False,
                 force_size: bool = False, on_download=None, **settings):
        """Sample a prompt with zero, one or several concepts (`-c` values: "NAME" or "NAME:STRENGTH").

        `settings` replace fields of `config` (lag=True, steps=25, seed=3, num_images=4, ...; None: the
        default), whose defaults are the model family's (`sample_config`).
        With `out_dir`, PNGs that say how they were made are written there, named after the prompt,
        the concepts (with their strengths) and LAG, never over an existing file unless `overwrite`,
        and listed in the result's `paths`. A size far past the model's or beyond this machine's
        memory is refused unless `force_size` (`persres.sizes`)."""
        from persres import families
        from persres.generation import bind_prompt, write_images
        from persres.sample import SAMPLE_BATCH, generate
        from persres.sizes import check_size

        given = {k: v for k, v in settings.items() if v is not None}
        SampleConfig(**given)  # a bad value is one line before any loading (the family's defaults come after it)
        if out_dir is not None:
            from persres.images import check_writable_dir

            check_writable_dir(Path(out_dir))
        if backend is not None:
            from persres.kernels import resolve_backend

            resolve_backend(backend)  # an unknown or unavailable backend is one line before any loading
        expanded, bound = bind_prompt(prompt, concepts, self.registry)  # a prompt error before any loading
        pipe = self.pipeline(on_download=on_download)
        config = (config or self.sample_config()).replace(**given)  # the family is known now, downloaded or not
        guided = families.of(pipe).guidance_in_batch(config.guidance)
        per_pass = min(config.num_images, SAMPLE_BATCH) * (2 if guided else 1)  # CFG: two halves
        side = families.of(pipe).native_side(pipe)
        check_size(pipe, config.height or side, config.width or side, per_pass, training=False,
                   force=force_size)
        self.apply_concepts([c.name for c in bound])
        result = generate(pipe, expanded, bound, config, backend, on_step=on_step)
        if out_dir is not None:
            result.paths = write_images(result, prompt, bound, config, self.model, Path(out_dir), sheet=sheet, overwrite=overwrite)
        return result


def default_model(registry: Registry) -> tuple[str, str | None]:
    """(the model commands use when none is named, its configs directory): $PERSRES_MODEL wins over
    `persres config model`, which wins over the toy model."""
    if os.environ.get("PERSRES_MODEL"):
        return os.environ["PERSRES_MODEL"], None
    return registry.setting(DEFAULT_MODEL_KEY) or "toy", registry.setting(DEFAULT_MODEL_CONFIG_KEY)


def set_default_model(registry: Registry, value: str | None, model_config: str | None = None) -> None:
    """`persres config model VALUE [--config DIR]` (None: back to the toy model). A single file is
    loaded once here, so that it is proven loadable now and not at the first train."""
    registry.require_writable()
    if value is None:
        registry.set_setting(DEFAULT_MODEL_KEY, None)
        registry.set_setting(DEFAULT_MODEL_CONFIG_KEY, None)
        return
    checked = check_model_value(value)
    if model_config is not None and not is_single_file(checked):
        raise InputError("--config is for single-file checkpoints; a diffusers directory or hub id carries its own")
    if is_single_file(checked):
        from persres.models import load_pipeline

        load_pipeline(checked, config=model_config)
    registry.set_setting(DEFAULT_MODEL_KEY, checked)
    registry.set_setting(DEFAULT_MODEL_CONFIG_KEY, str(Path(model_config).expanduser().resolve()) if model_config else None)
