"""persres's library calls as plain functions, for callers that already hold a registry or a pipeline.

The object API is `persres.Workspace` (docs/python-api.md); each function here is one call on
a workspace made from its arguments:

    from persres.api import train_concept, generate_images
    outcome = train_concept("photos/", name="mydog", class_word="dog")
    paths, result = generate_images("a V* dog on the beach", ["mydog"], config=SampleConfig(lag=True), out_dir="out/")

For a pipeline you already hold: `persres.api.apply_concepts(pipe, ["mydog"])`, then
`persres.sample.generate(pipe, prompt, concepts, SampleConfig(lag=True))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from persres.config import SampleConfig, TrainConfig
from persres.generation import bind_prompt, generation_metadata  # noqa: F401  (part of this API)
from persres.settings import read_defaults
from persres.registry import ConceptRecord, Registry
from persres.settings import config_digest, effective_settings, train_config_from  # noqa: F401  (part of this API)
from persres.settings import settings_sources as _sources
from persres.workspace import DEFAULT_MODEL_CONFIG_KEY, DEFAULT_MODEL_KEY, TOY_NOTICE_KEY, TrainOutcome, Workspace  # noqa: F401


def train_config_for(model: str, overrides: dict) -> TrainConfig:
    """Paper defaults, then the model's own recommended defaults, then what the user gave."""
    return train_config_from(read_defaults(model).train, overrides)


def settings_sources(model: str, overrides: dict) -> dict[str, str]:
    return _sources(read_defaults(model).train, overrides)


def _workspace(model, registry, pipe=None, model_config=None, device="auto", precision="auto") -> Workspace:
    return Workspace(model, registry=registry, pipe=pipe, model_config=model_config, device=device, precision=precision)


def suggest_class_for(images_dir: str | Path, *, model: str | None = None, candidates: str | None = None, config=None,
                      registry: Registry | None = None, pipe=None, model_config: str | None = None):
    """`persres suggest-class`: rank candidate class words for a folder of images with the base model."""
    return _workspace(model, registry, pipe, model_config).suggest_class(images_dir, candidates, config)


def train_concept(images_dir: str | Path, name: str, class_word: str | None, *, model: str | None = None, config: TrainConfig | None = None,
                  overrides: dict | None = None, registry: Registry | None = None, progress=None, pipe=None,
                  sources: dict[str, str] | None = None, model_config: str | None = None, on_suggested=None) -> TrainOutcome:
    """Train a concept from a folder of images and register its pack (`Workspace.train`)."""
    return _workspace(model, registry, pipe, model_config).train(images_dir, name, class_word, config=config, overrides=overrides,
                                                                 progress=progress, sources=sources, on_suggested=on_suggested)


def import_concept(path: str | Path, name: str | None = None, class_word: str | None = None, identifier: str | None = None, *,
                   model: str | None = None, registry: Registry | None = None, proj_out_only: bool = False, pipe=None,
                   model_config: str | None = None) -> ConceptRecord:
    """Register a persres pack, or a proj_out LoRA from another tool (`Workspace.import_concept`)."""
    return _workspace(model, registry, pipe, model_config).import_concept(path, name, class_word, identifier, proj_out_only=proj_out_only)


def apply_concepts(pipe, names: Sequence[str], registry: Registry | None = None, model: str | None = None):
    """Load registered concepts onto a StableDiffusionPipeline you hold; returns them bound for prompts."""
    from persres.fitting import apply_concepts as apply

    return apply(pipe, registry or Registry(), names, model)


def generate_images(prompt: str, concept_names: Sequence[str] = (), *, config: SampleConfig = SampleConfig(), model: str | None = None,
                    out_dir: str | Path = ".", registry: Registry | None = None, device: str = "auto", precision: str = "auto",
                    backend: str | None = None, pipe=None, sheet: bool = False, on_step=None, model_config: str | None = None):
    """(paths written, `sample.Generated`) for a prompt and its concepts (`Workspace.generate`)."""
    ws = _workspace(model, registry, pipe, model_config, device, precision)
    result = ws.generate(prompt, concept_names, config, out_dir=out_dir, backend=backend, sheet=sheet, on_step=on_step)
    return result.paths, result
