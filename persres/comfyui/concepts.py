"""A node's concepts: "name[:strength], ..." resolved, bound to the prompt, turned into ComfyUI's LoRA patches.

A name is a concept of the persres registry (`PERSRES_HOME`) or a file in ComfyUI's `loras` folder
(with or without `.safetensors`): a persres pack, or any LoRA `persres import` takes, with its trigger
words read from its metadata (`interop.metadata.lora_trigger`); a LoRA file without trigger words acts
everywhere, as ComfyUI's LoraLoader applies it. Every concept becomes a kohya-named LoRA state dict, the
form ComfyUI's own LoRA loader reads (`persres export --format kohya` writes the same tensors), so the
layer names are ComfyUI's decision, not persres's.

Nothing here imports ComfyUI: parsing, resolving and binding run anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from persres import families
from persres.errors import ConceptNotFound, PromptError
from persres.families import Family
from persres.tokens import BoundConcept, expand_prompt, split_concept_option


@dataclass(frozen=True)
class Concept:
    bound: BoundConcept  # name, identifier, class word, strength, everywhere
    lora: dict[str, torch.Tensor]  # kohya-named LoRA tensors (lora_unet_*, lora_te*_*)
    family: Family | None  # the family it was made for, where it says so (a registry concept, a pack)
    source: str  # where it came from, for messages


def parse(text: str) -> list[tuple[str, float]]:
    """"name[:strength], ..." -> [(name, strength)]; PromptError naming what is malformed."""
    if not text.strip():
        return []
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise PromptError(f"concepts {text!r} has an empty entry: write name[:strength], name[:strength], ...")
        name, strength = split_concept_option(item)
        name = name.strip()
        if not name:
            raise PromptError(f"concepts entry {item!r} has no name: write name[:strength]")
        if name in [n for n, _ in out]:
            raise PromptError(f"concept {name!r} is given twice in {text!r}")
        out.append((name, strength))
    return out


class Sources:
    """Where a node's concept names resolve: the persres registry, then ComfyUI's `loras` folder.

    `lora_path(name)`: the full path of a file in ComfyUI's loras folder, or None (`folder_paths`)."""

    def __init__(self, lora_path: Callable[[str], str | None], registry=None):
        self._lora_path = lora_path
        self._registry = registry

    @property
    def registry(self):
        if self._registry is None:
            from persres.registry import Registry

            self._registry = Registry(sweep=False)  # read here, never repaired from inside ComfyUI
        return self._registry

    def file(self, name: str) -> Path | None:
        for candidate in (name, f"{name}.safetensors"):
            found = self._lora_path(candidate)
            if found:
                return Path(found)
        return None

    def bound(self, name: str) -> BoundConcept:
        """The concept as a prompt binds it (identifier, class word), without reading its tensors."""
        from persres.interop.metadata import lora_trigger
        from persres.packs import CONFIG_KEY, file_metadata, read_meta

        if name in self.registry.names():
            return self.registry.get(name).bound()
        path = self.file(name)
        if path is None:
            known = ", ".join(self.registry.names()) or "none registered"
            raise ConceptNotFound(f"unknown concept {name!r}: not in the persres registry (known: {known}) "
                                  "nor a file in ComfyUI's loras folder")
        metadata = file_metadata(path)
        if CONFIG_KEY in metadata:
            meta = read_meta(path)
            return BoundConcept(name, meta.identifier, meta.class_word, everywhere=meta.everywhere)
        identifier, class_word = lora_trigger(metadata)
        if identifier is None:  # no trigger words: it acts everywhere, as ComfyUI's LoraLoader applies it
            return BoundConcept(name, "", "", everywhere=True)
        return BoundConcept(name, identifier, class_word or "", everywhere=metadata.get("persres.everywhere") == "true")

    def concept(self, bound: BoundConcept) -> Concept:
        """The concept's tensors, kohya-named."""
        from persres.interop import kohya
        from persres.packs import CONFIG_KEY, file_metadata, read_pack

        if bound.name in self.registry.names():
            (tensors, meta), source = self.registry.load(bound.name), f"persres concept {bound.name!r}"
        else:
            path = self.file(bound.name)
            if CONFIG_KEY not in file_metadata(path):
                return Concept(bound, lora_tensors(path), None, str(path))
            (tensors, meta), source = read_pack(path), str(path)
        return Concept(bound, kohya.write(tensors, meta, meta.proj_out == "Conv2d"), families.of_meta(meta), source)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors, kohya-named: a kohya file as it is, a peft/diffusers one renamed
    (`lora_unet_` + the diffusers path, `lora_te_`/`lora_te2_` + the text encoder's)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from persres.interop import peft
    from persres.interop.lora import lora_format

    fmt = lora_format(path)  # refuses LoHa, LoKr, DoRA, embeddings and unknown files by name
    tensors = load_file(str(path))
    if fmt == "kohya":
        return tensors
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    out = {}
    for module, (up, down, alpha) in peft.read(tensors, metadata).items():
        component, _, rest = module.partition(".")
        if component == "text_encoder_2":
            name = "lora_te2_" + ("text_model." + rest.removeprefix("text_model.")).replace(".", "_")
        elif component == "text_encoder":
            name = "lora_te_" + ("text_model." + rest.removeprefix("text_model.")).replace(".", "_")
        else:
            name = "lora_unet_" + (rest if component in ("unet", "transformer") else module).replace(".", "_")
        out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"], out[f"{name}.alpha"] = up, down, alpha
    return out


def bind(text: str, specs: Sequence[tuple[str, float]], sources: Sources) -> tuple[str, list[BoundConcept]]:
    """The prompt with identifiers in place of `V*`, `V1`, `<name>`, and every concept it uses, in order."""
    given = [dataclasses.replace(sources.bound(name), strength=strength) for name, strength in specs]
    return expand_prompt(text, given, sources.bound)
