"""The library calls behind every CLI command: train a concept, generate, export, import.

    from persres.api import train_concept, generate_images
    record, result = train_concept("photos/", name="mydog", class_word="dog")
    paths = generate_images("a V* dog on the beach", ["mydog"], lag=True, out_dir="out/")

For a pipeline you already hold: `persres.api.apply_concepts(pipe, ["mydog"])`, then
`persres.sample.generate(pipe, prompt, concepts, SampleConfig(lag=True))`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from persres import __version__
from persres.config import SampleConfig, TrainConfig
from persres.images import check_writable_dir, contact_sheet, read_folder, save_png, warn_if_small
from persres.errors import InputError, PersresError
from persres.families import family_of
from persres.models import (DEFAULTS_FILE, fingerprint, is_default_toy, is_single_file, load_pipeline, model_class_candidates, model_defaults,
                            pick_device, pick_dtype, resolve_model)
from persres.packs import PackMeta, sha256_file
from persres.registry import ConceptRecord, Registry
from persres.residuals import block_channels, proj_out_kind
from persres.sample import Generated, apply_pack, generate, mask_overlay
from persres.tokens import BoundConcept, check_class_word, expand_prompt, is_single_token, split_concept_option

DEFAULT_MODEL_KEY = "default_model"
TOY_NOTICE_KEY = "toy_notice_shown"
DEFAULT_MODEL_CONFIG_KEY = "default_model_config"  # the configs directory of a single-file default model


def model_for(registry: Registry, model: str | None) -> tuple[str, bool]:
    """(resolved model, whether this is the first use of the toy model as the silent default)."""
    configured = registry.setting(DEFAULT_MODEL_KEY)
    resolved = resolve_model(model, configured)
    first_toy = is_default_toy(model, configured) and registry.setting(TOY_NOTICE_KEY) is None
    if first_toy:
        registry.set_setting(TOY_NOTICE_KEY, "1")
    return resolved, first_toy


def model_config_for(registry: Registry, model: str, given: str | None = None) -> str | None:
    """The diffusers configs directory for a single-file `model`: the one given, else
    $PERSRES_MODEL_CONFIG, else the one `config model FILE --config DIR` stored with it."""
    import os

    if given or os.environ.get("PERSRES_MODEL_CONFIG"):
        return given or os.environ["PERSRES_MODEL_CONFIG"]
    return registry.setting(DEFAULT_MODEL_CONFIG_KEY) if model == registry.setting(DEFAULT_MODEL_KEY) else None


def train_config_for(model: str, overrides: dict) -> TrainConfig:
    """Paper defaults, then the model's own recommended defaults, then what the user gave."""
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recommended = {k: v for k, v in model_defaults(model).items() if k in fields}
    try:
        TrainConfig(**recommended)
    except PersresError as e:
        raise InputError(f"the model's {DEFAULTS_FILE} has a bad training default: {e}") from None
    return TrainConfig(**{**recommended, **given})


PAPER_FIELDS = ("steps", "batch_size", "lr", "rank_ratio", "prompt")  # set by the paper (Sec. 4); the rest are persres's
SHOWN_FIELDS = ("steps", "batch_size", "lr", "lr_schedule", "snr_gamma", "rank_ratio", "rank", "resolution", "init", "flip", "scale_min", "prompt", "seed",
                "device", "precision")


def settings_sources(model: str, overrides: dict) -> dict[str, str]:
    """Where each training setting comes from: "option", "model default" (its persres_defaults.json),
    "paper" or "persres"."""
    given = {k for k, v in overrides.items() if v is not None}
    recommended = set(model_defaults(model))
    return {f: "option" if f in given else "model default" if f in recommended else "paper" if f in PAPER_FIELDS else "persres"
            for f in SHOWN_FIELDS}


def effective_settings(config: TrainConfig, sources: dict[str, str]) -> str:
    """One line: every training setting, its value and where it came from; auto device/precision resolved."""
    device = pick_device(config.device)
    dtype = str(pick_dtype(config.precision, device)).removeprefix("torch.")
    values = {**config.to_dict(), "device": device.type if config.device == "auto" else config.device,
              "precision": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]}
    parts = []
    for f in SHOWN_FIELDS:
        value = values[f]
        if value is None:
            continue
        source = "auto" if f in ("device", "precision") and getattr(config, f) == "auto" else sources[f]
        shown = repr(value) if f == "prompt" else value
        parts.append(f"{f} {shown} ({source})")
    return ", ".join(parts)


# settings added after packs were named by this digest: at these values they leave it as it was
LATER_FIELDS = {"lr_schedule": "constant", "snr_gamma": None}


def config_digest(config: TrainConfig, model: str, weights: str | None = None) -> str:
    """A short, stable digest of (training config, base model path[, its weights' fingerprint]).

    Without `weights` it is what a pack records (train_config["config_digest"]: what was asked
    for); with them (`models.base_weights`) it also tells apart packs trained on other weights
    saved at the same path, which is what names a benchmark's own packs."""
    settings = {k: v for k, v in config.to_dict().items() if LATER_FIELDS.get(k, object()) != v}
    key = [settings, model] + ([weights] if weights is not None else [])
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class TrainOutcome:
    record: ConceptRecord
    losses: list[float]
    seconds: float
    model: str


def class_candidates(model: str, given: str | None = None) -> list[str]:
    """The words suggest-class ranks: `--candidates` if given, else the model's own list
    (its persres_defaults.json), else the built-in nouns."""
    from persres.suggest import parse_candidates

    if given is not None:
        return parse_candidates(given)
    return model_class_candidates(model) or parse_candidates(None)


def suggest_class_for(
    images_dir: str | Path,
    *,
    model: str | None = None,
    candidates: str | None = None,
    config=None,
    registry: Registry | None = None,
    pipe=None,
    model_config: str | None = None,
):
    """`persres suggest-class`: rank candidate class words for a folder of images with the base model."""
    from persres.suggest import SuggestConfig, suggest

    registry = registry or Registry()
    references = read_folder(images_dir)
    model, _ = model_for(registry, model)
    entries = class_candidates(model, candidates)
    if pipe is None:
        pipe = load_pipeline(model, config=model_config_for(registry, model, model_config))
    return suggest(pipe, [r.image for r in references], entries, config or SuggestConfig())


def train_concept(
    images_dir: str | Path,
    name: str,
    class_word: str | None,
    *,
    model: str | None = None,
    config: TrainConfig | None = None,
    overrides: dict | None = None,
    registry: Registry | None = None,
    progress=None,
    pipe=None,
    sources: dict[str, str] | None = None,
    model_config: str | None = None,
    on_suggested=None,
) -> TrainOutcome:
    """Train a concept from a folder of images and register its pack. Nothing is registered on failure.

    `class_word` None or "auto": the base model suggests it first (`persres.suggest`, the
    built-in candidates); `on_suggested(suggestion)` hears the pick before training starts."""
    from persres.train import train_residuals

    registry = registry or Registry()
    registry.require_writable()
    registry.check_new_name(name)
    auto = class_word is None or class_word == "auto"
    class_word = None if auto else check_class_word(class_word)
    references = read_folder(images_dir)
    model, _ = model_for(registry, model)
    config = config or train_config_for(model, overrides or {})
    if pipe is None:
        device = pick_device(config.device)
        pipe = load_pipeline(model, device, pick_dtype(config.precision, device), model_config_for(registry, model, model_config))
    from persres.train import default_resolution

    warn_if_small(references, config.resolution or default_resolution(pipe))
    class_info = {"class_source": "given"}
    if auto:
        from persres.suggest import SuggestConfig, suggest

        suggestion = suggest(pipe, [r.image for r in references], class_candidates(model), SuggestConfig(seed=config.seed))
        class_word = suggestion.best
        class_info = {"class_source": "suggested", "class_suggestions": suggestion.top(5),
                      "class_evaluations": suggestion.evaluations}
        if on_suggested is not None:
            on_suggested(suggestion)
    with registry.reservation(name, fits=lambda ident: is_single_token(pipe.tokenizer, ident)) as identifier:
        result = train_residuals(pipe, [r.image for r in references], identifier, class_word, config, progress)
        return _register(registry, pipe, name, identifier, class_word, model, config, references, result,
                         {"sources": sources, **class_info})


def _register(registry, pipe, name, identifier, class_word, model, config, references, result, extra) -> TrainOutcome:
    meta = trained_meta(pipe, name, identifier, class_word, model, config, references, result, extra)
    record = registry.add(result.tensors, meta)
    return TrainOutcome(record, result.losses, result.seconds, model)


def trained_meta(pipe, name, identifier, class_word, model, config, references, result, extra=None) -> PackMeta:
    """Everything a freshly trained pack says about itself; `extra` joins its train_config
    (where each setting came from, how the class word was chosen)."""
    fp = fingerprint(pipe.unet)
    return PackMeta(
        name=name, identifier=identifier, class_word=class_word, ranks=result.ranks,
        channels=block_channels(pipe.unet), parameter_count=result.parameter_count,
        base_model=model, architecture=fp.architecture, weights=fp.weights, proj_out=proj_out_kind(pipe.unet),
        family=family_of(pipe),
        train_config={**config.to_dict(), "prompt_template": config.prompt, "resolution": result.resolution, "prompt": result.prompt,
                      **{k: v for k, v in (extra or {}).items() if v},
                      "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
                      "config_digest": config_digest(config, model),  # train-many: same config, same model -> done
                      **({"checkpoint_sha256": sha256_file(Path(model))} if is_single_file(model) else {})},
        image_hashes=[r.sha256 for r in references],
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        loss_start=result.losses[0], loss_end=result.losses[-1], seconds=result.seconds,
    )


def import_concept(
    path: str | Path,
    name: str | None = None,
    class_word: str | None = None,
    identifier: str | None = None,
    *,
    model: str | None = None,
    registry: Registry | None = None,
    proj_out_only: bool = False,
    pipe=None,
    model_config: str | None = None,
) -> ConceptRecord:
    """Register a persres pack, or any proj_out LoRA (kohya, diffusers/peft, a persres export) fitted to `model`.

    A foreign file needs a name and a class word (given, or found in its persres.* metadata); its
    identifier is the one given, the one in its metadata, or a fresh one.
    """
    from persres.interop.lora import read_foreign
    from persres.packs import CONFIG_KEY, IDENTIFIER_RE, check_regular_file, file_metadata

    registry = registry or Registry()
    registry.require_writable()
    path = Path(path)
    check_regular_file(path)
    metadata = file_metadata(path)
    if CONFIG_KEY in metadata:
        return registry.import_pack(path, name)
    name = name or metadata.get("persres.name")
    class_word = class_word or metadata.get("persres.class_word")
    if not name or not class_word:
        raise InputError(f"{str(path)!r} is a LoRA file, not a persres pack: give --name and --class to import it")
    registry.check_new_name(name)
    class_word = check_class_word(class_word)
    identifier = identifier or metadata.get("persres.identifier")
    if identifier is not None and not IDENTIFIER_RE.fullmatch(identifier):
        raise InputError(f"the identifier must be 1-32 lowercase letters, got {identifier!r}")
    model, _ = model_for(registry, model)
    if pipe is None:
        pipe = load_pipeline(model, config=model_config_for(registry, model, model_config))
    if identifier is not None and not is_single_token(pipe.tokenizer, identifier):
        raise InputError(f"the identifier {identifier!r} is not one token of this model's tokenizer; pick another with --identifier")
    lora = read_foreign(path, block_channels(pipe.unet), proj_out_only)
    fp = fingerprint(pipe.unet)
    tensors = {}
    for block, (up, down) in lora.factors.items():
        tensors[f"{block}.up"], tensors[f"{block}.down"] = up, down
    channels = block_channels(pipe.unet)
    ranks = {block: up.shape[1] for block, (up, _) in lora.factors.items()}

    def meta_for(ident: str) -> PackMeta:
        return PackMeta(
            name=name, identifier=ident, class_word=class_word, ranks=ranks, channels=channels,
            parameter_count=sum(2 * channels[b] * r for b, r in ranks.items()), base_model=model,
            architecture=fp.architecture, weights=fp.weights, proj_out=proj_out_kind(pipe.unet), family=family_of(pipe),
            train_config={"imported_from": lora.fmt, "source_file": path.name},
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )

    if identifier is not None:
        return registry.add(tensors, meta_for(identifier), allow_shared_identifier=True)
    with registry.reservation(name, fits=lambda ident: is_single_token(pipe.tokenizer, ident)) as fresh:
        return registry.add(tensors, meta_for(fresh))


def apply_concepts(pipe, names: Sequence[str], registry: Registry | None = None, model: str | None = None) -> list[BoundConcept]:
    """Load registered concepts onto a StableDiffusionPipeline; returns them bound for prompts."""
    registry = registry or Registry()
    fp = fingerprint(pipe.unet)  # once for all packs
    bound = []
    for name in names:
        tensors, meta = registry.load(name)
        meta = dataclasses.replace(meta, name=name)
        apply_pack(pipe, tensors, meta, model, fp)
        bound.append(BoundConcept(name, meta.identifier, meta.class_word))
    return bound


def bind_prompt(prompt: str, concept_names: Sequence[str], registry: Registry) -> tuple[str, list[BoundConcept]]:
    """The prompt with identifiers in place of placeholders, and its concepts; a -c value may
    carry a strength ("name:0.8")."""
    given = []
    for option in concept_names:
        name, strength = split_concept_option(option)
        given.append(dataclasses.replace(registry.get(name).bound(), strength=strength))
    return expand_prompt(prompt, given, lambda n: registry.get(n).bound())


def generation_metadata(prompt: str, expanded: str, seed: int, concepts: Sequence[BoundConcept], config: SampleConfig, model: str) -> dict:
    """What a generated PNG carries, so that an image says how it was made."""
    return {
        "prompt": prompt, "expanded_prompt": expanded, "seed": seed,
        "concepts": ",".join(c.name for c in concepts), "identifiers": ",".join(c.identifier for c in concepts),
        "strengths": ",".join(f"{c.strength:g}" for c in concepts),
        "lag": config.lag, "steps": config.steps, "guidance": config.guidance, "eta": config.eta,
        "model": model, "persres_version": __version__,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "image"


def generate_images(
    prompt: str,
    concept_names: Sequence[str] = (),
    *,
    config: SampleConfig = SampleConfig(),
    model: str | None = None,
    out_dir: str | Path = ".",
    registry: Registry | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str | None = None,
    pipe=None,
    sheet: bool = False,
    on_step=None,
    model_config: str | None = None,
) -> tuple[list[Path], Generated]:
    """Expand the prompt, load its concepts, sample, and write PNGs that say how they were made
    (with `sheet`, also one enlarged contact sheet of the call: images, then each concept's masks)."""
    registry = registry or Registry()
    check_writable_dir(Path(out_dir))
    expanded, concepts = bind_prompt(prompt, concept_names, registry)
    model, _ = model_for(registry, model)
    if pipe is None:
        dev = pick_device(device)
        pipe = load_pipeline(model, dev, pick_dtype(precision, dev), model_config_for(registry, model, model_config))
    apply_concepts(pipe, [c.name for c in concepts], registry, model)
    result = generate(pipe, expanded, concepts, config, backend, on_step=on_step)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    stem = f"{_slug(prompt)}-{'lag' if config.lag else 'nolag'}"
    mask_rows: dict[str, list] = {}
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        path = out / f"{stem}-{seed}.png"
        save_png(image, path, generation_metadata(prompt, expanded, seed, concepts, config, model))
        paths.append(path)
        for k, (name, per_image) in enumerate(result.masks.items()):
            overlay = mask_overlay(image, per_image[i], k)
            mask_path = path.with_name(f"{path.stem}.mask-{name}.png")
            overlay.save(mask_path)
            paths.append(mask_path)
            mask_rows.setdefault(name, []).append(overlay)
    if sheet:
        sheet_path = out / f"{stem}-sheet.png"
        contact_sheet([result.images, *mask_rows.values()]).save(sheet_path)
        paths.append(sheet_path)
    return paths, result
