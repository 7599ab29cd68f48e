"""The library calls persres's ComfyUI nodes make (`persres.comfyui.nodes` renders them as nodes).

    model, positive = apply_concepts(model, clip, "a photo of V1 dog and V2 cat", "rex, tom:0.8", lag=True)
    masks = regions(model)  # after sampling: {concept: (b, h, w) in [0, 1]}

With `lag` every concept acts in its own region, found in the same denoiser evaluation
(`persres.comfyui.patch`); without it the concepts go to ComfyUI's own weight patches, exactly as
its LoraLoader applies them (no extra cost, no regions).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from persres import families
from persres.comfyui import NODE_PACK
from persres.comfyui.concepts import Concept, Sources, bind, parse
from persres.comfyui.patch import Factors, LagPatch
from persres.errors import IncompatiblePack, InputError, PackError
from persres.lag import ConceptTokens
from persres.tokens import BoundConcept, concept_span


def sources() -> Sources:
    """Names resolve in the persres registry, then in ComfyUI's `loras` folder."""
    import folder_paths

    return Sources(lambda name: folder_paths.get_full_path("loras", name))


def family_of(model) -> families.Family:
    """The persres family of a ComfyUI MODEL, from ComfyUI's own model config."""
    config = type(model.model.model_config).__name__
    family = families.of_comfyui(config)
    if family is None:
        takes = ", ".join(f.label for f in families.FAMILIES.values() if f.comfyui_models)
        raise InputError(f"persres's ComfyUI nodes take {takes} models; this one is ComfyUI's {config}")
    return family


def transformers(model) -> dict[tuple[str, int], tuple[str, int]]:
    """ComfyUI's attn2 slots, (kind, number) -> (the transformer's path in the model, its layers):
    input_blocks.N.* -> ("input", N), middle_block.* -> ("middle", 0), output_blocks.N.* -> ("output", N)."""
    out = {}
    for path, module in model.model.diffusion_model.named_modules():
        if type(module).__name__ != "SpatialTransformer":
            continue
        if m := re.fullmatch(r"(input|output)_blocks\.(\d+)\.\d+", path):
            key = (m[1], int(m[2]))
        elif re.fullmatch(r"middle_block\.\d+", path):
            key = ("middle", 0)
        else:
            continue
        out[key] = (f"diffusion_model.{path}", len(module.transformer_blocks))
    return out


class ComfyTokens:
    """What `persres.tokens.concept_span` reads of a tokenizer, over ComfyUI's own tokenization of one
    prompt (its emphasis syntax and 77-token chunks included): positions in the conditioning it encodes."""

    def __init__(self, clip, prompt: str):
        self.clip, self.prompt = clip, prompt
        tokens = clip.tokenize(prompt)  # {"l": [[(id, weight), ...] per 77-token chunk]} (and "g" on SDXL)
        self.key = "l" if "l" in tokens else next(iter(tokens))
        self.prompt_ids = [t[0] for chunk in tokens[self.key] for t in chunk]
        self.model_max_length = len(self.prompt_ids)
        framed = [t[0] for t in clip.tokenize("")[self.key][0]]  # [start, end, pad...]
        self.end = framed[1]

    def __call__(self, text: str, add_special_tokens: bool = True):
        if add_special_tokens:
            if text != self.prompt:
                raise ValueError("ComfyTokens frames only the prompt it was made for")
            ids = self.prompt_ids
        else:
            chunk = [t[0] for t in self.clip.tokenize(text)[self.key][0]][1:]
            ids = chunk[: chunk.index(self.end)] if self.end in chunk else chunk
        return type("Encoding", (), {"input_ids": ids})()


def concept_tokens(clip, prompt: str, bound: Sequence[BoundConcept]) -> list[ConceptTokens]:
    tokenizer = ComfyTokens(clip, prompt)
    spans = [(c, concept_span(tokenizer, prompt, c.identifier, c.class_word)) for c in bound if not c.everywhere]
    return [ConceptTokens(c.name, span.positions, span.class_word) for c, span in spans]


def lora_patches(concept: Concept, unet_keys: Mapping[str, str], clip_keys: Mapping[str, str]):
    """ComfyUI's own patches of a concept's LoRA: (denoiser patches, text encoder patches); a layer of
    neither is refused by name."""
    import comfy.lora

    targets = {k.split(".", 1)[0] for k in concept.lora}
    stray = sorted(t for t in targets if t not in unet_keys and t not in clip_keys)
    if stray:
        fits = len(targets) - len(stray)
        raise IncompatiblePack(f"{concept.source} changes {len(stray)} layer(s) this model does not have (e.g. {stray[0]})"
                               + (f" beside {fits} it has" if fits else "") + ": it was made for another model")
    unet = comfy.lora.load_lora(concept.lora, dict(unet_keys), log_missing=False)
    clip = comfy.lora.load_lora(concept.lora, dict(clip_keys), log_missing=False)
    return unet, clip


def factors_of(concept: Concept, key, adapter, shape: torch.Size) -> Factors:
    """A ComfyUI LoRA patch as persres's factors (A (m, r) with alpha / r folded in, B (r, n[, kh, kw]))."""
    from persres.interop.lora import checked_factors, with_mid

    where = f"{concept.source}, {key}"
    if isinstance(key, tuple) or getattr(adapter, "name", None) != "lora":
        what = getattr(adapter, "name", type(adapter).__name__)
        raise PackError(f"{where}: a {what} change, not a plain low-rank LoRA: LAG applies W + A B changes")
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if dora_scale is not None or reshape is not None:
        raise PackError(f"{where}: a DoRA or reshaping LoRA, not a plain low-rank one: LAG applies W + A B changes")
    if mid is not None:
        down = with_mid(Path(concept.source), str(key), {"lora_down.weight": down, "lora_mid.weight": mid})
    return checked_factors(where, up, down, alpha, shape[0], tuple(shape[1:]))


def encode(clip, prompt: str, splices: Sequence[tuple[dict, float, Sequence[int]]] = ()) -> list:
    """ComfyUI CONDITIONING of the prompt; each (text encoder patches, strength, positions) splices that
    concept's own encoding in at its own tokens (pooled outputs stay the base encoder's)."""
    tokens = clip.tokenize(prompt)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    for patches, strength, positions in splices:
        own_clip = clip.clone()
        own_clip.add_patches(patches, strength)
        own = own_clip.encode_from_tokens(tokens, return_dict=True)["cond"]
        cond = cond.clone()
        cond[:, list(positions)] = own[:, list(positions)]
    return [[cond, out]]


def apply_concepts(model, clip, text: str, concepts: str, lag: bool = True, found: Sources | None = None):
    """(MODEL, CONDITIONING): ComfyUI's model with the concepts on it and the prompt, identifiers bound."""
    import comfy.lora

    family = family_of(model)
    found = found or sources()
    prompt, bound = bind(text, parse(concepts), found)
    loaded = [found.concept(b) for b in bound]
    check_family(loaded, family)
    unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    patches = [lora_patches(c, unet_keys, clip_keys) for c in loaded]
    tokens = concept_tokens(clip, prompt, bound)
    if not loaded:  # no concepts: the model as it is, the prompt encoded
        return model.clone(), encode(clip, prompt)
    if not lag:
        model, clip = model.clone(), clip.clone()
        for b, (unet, text_patches) in zip(bound, patches):
            model.add_patches(unet, b.strength)
            clip.add_patches(text_patches, b.strength)
        return model, encode(clip, prompt)
    positions = {t.name: t.positions for t in tokens}
    splices = [(text_patches, b.strength, positions[b.name]) for b, (_, text_patches) in zip(bound, patches)
               if text_patches and b.name in positions]
    return lag_model(model, loaded, [unet for unet, _ in patches], tokens), encode(clip, prompt, splices)


def check_family(loaded: Sequence[Concept], family: families.Family) -> None:
    for concept in loaded:
        if concept.family is not None and concept.family is not family:
            raise IncompatiblePack(f"{concept.source} was made for {concept.family.label}; this model is {family.label}")


def lag_model(model, loaded: Sequence[Concept], unet_patches: Sequence[Mapping], tokens: Sequence[ConceptTokens]):
    """A clone of ComfyUI's `model` with each concept's denoiser layers (`unet_patches`, ComfyUI's own
    LoRA patches of it) acting in the concept's region of the prompt's `tokens`."""
    changes: dict[str, dict[str, Factors]] = {}
    for concept, unet in zip(loaded, unet_patches):
        for key, adapter in unet.items():
            path = key[0] if isinstance(key, tuple) else key
            shape = model.get_model_object(path).shape
            changes.setdefault(path.removesuffix(".weight"), {})[concept.bound.name] = factors_of(concept, key, adapter, shape)
    bound = [c.bound for c in loaded]
    lag_patch = LagPatch(tokens, {b.name: b.strength for b in bound}, [b.name for b in bound if b.everywhere])
    return lag_patch.apply(model, changes, transformers(model), family_of(model))


def regions(model) -> dict[str, torch.Tensor]:
    """Each concept's region of the last sampling call with this model: (b, h, w) in [0, 1] on the latent grid."""
    patch = model.get_attachment(NODE_PACK) if hasattr(model, "get_attachment") else None
    if patch is None:
        raise InputError("this model carries no persres concepts with LAG: connect PersresConcepts' model (lag on)")
    if not patch.masks:
        raise InputError("no regions yet: sample with this model first (connect the images decoded from its sampler)")
    return patch.masks
