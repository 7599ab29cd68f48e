"""Does a pack fit this model, and loading it onto a pipeline you hold.

A pack records the architecture and weights fingerprint of the model it was trained on
(`models.Fingerprint`): another architecture is refused, naming both families; another
checkpoint of the same architecture (two fine-tunes of one base model, say) loads with a warning.
"""

from __future__ import annotations

import warnings

import torch

from persres import layers, residuals
from persres.errors import IncompatiblePack
from persres import families
from persres.models import Fingerprint, fingerprint
from persres.packs import PackMeta


class OtherCheckpointWarning(UserWarning):
    """A pack trained on another checkpoint of the same architecture (two fine-tunes of one base model, say)."""


def check_fit(meta: PackMeta, fp: Fingerprint, model: str, family: families.Family | None = None) -> None:
    """Refuse a pack of another architecture or family (naming both families); warn for another checkpoint of
    the same one. (Two families may share layer shapes: FLUX.2 klein and dev differ in their guidance input.)"""
    ours = families.of_meta(meta)
    if meta.architecture != fp.architecture or (family is not None and ours is not family):
        theirs = family.label if family is not None else "another architecture"
        kind = f"an {ours.label} pack" if ours is family or family is None else f"an {ours.label} pack, not {theirs}"
        raise IncompatiblePack(
            f"pack {meta.name!r} is {kind}: it was trained on {meta.base_model!r} (architecture {meta.architecture[:12]}), "
            f"which does not fit {model!r} ({theirs}, architecture {fp.architecture[:12]})"
        )
    if meta.weights != fp.weights:
        warnings.warn(
            f"pack {meta.name!r} was trained on another checkpoint ({meta.base_model!r}) of this architecture; "
            "it loads, but results may differ",
            OtherCheckpointWarning,
            stacklevel=2,
        )


# A residual this many times its base weight's size is damaged, not trained: residuals that
# persres trains stay near or below 1x (the toy model's full-rank packs: 0.1-1.2x per block).
MAX_RESIDUAL_RATIO = 50.0


def check_magnitude(pipe, tensors: dict[str, torch.Tensor], meta: PackMeta) -> None:
    """Refuse a pack whose ΔW = A B is far beyond its layer's base weight (naming both sizes)."""
    blocks = residuals.projections(families.denoiser(pipe))
    roots = layers.components(pipe)
    bases = {block: residuals.base_layer_of(blocks[block]) for block in meta.ranks}
    for key in meta.layers:
        component, path = layers.split(key)
        module = roots[component].get_submodule(path)
        bases[key] = module.base_layer if isinstance(module, residuals.ResidualLayer) else module
    for where, base_layer in bases.items():
        delta = layers.delta_norm(tensors[f"{where}.up"], tensors[f"{where}.down"])
        base = base_layer.weight.detach().double().norm()
        if not torch.isfinite(delta) or delta > MAX_RESIDUAL_RATIO * base:
            raise IncompatiblePack(f"pack {meta.name!r} is damaged: its residual on {where} has size {float(delta):.3g}, "
                                   f"{float(delta / base):.3g}x the base weight's {float(base):.3g} (at most {MAX_RESIDUAL_RATIO:g}x)")


def apply_pack(pipe, tensors: dict[str, torch.Tensor], meta: PackMeta, model: str | None = None, fp: Fingerprint | None = None) -> None:
    """Load a pack's residuals onto a diffusers pipeline you already hold (checked for fit and size)."""
    family = families.of(pipe)
    net = family.denoiser(pipe)
    check_fit(meta, fp or fingerprint(net), model or pipe.config.get("_name_or_path", "this model"), family)
    layers.check_layers(pipe, meta.name, meta.layers)
    check_magnitude(pipe, tensors, meta)
    unload(pipe, meta.name)
    if meta.ranks:
        residuals.load_concept(net, meta.name, tensors)
    layers.load_layers(pipe, meta.name, tensors, meta.layers)


def unload(pipe, name: str) -> None:
    """Take a concept off the pipeline: its proj_out residuals and every other layer it changes."""
    residuals.unload_concept(families.denoiser(pipe), name)
    layers.unload_layers(pipe, name)


def apply_concepts(pipe, registry, names, model: str | None = None, fp: Fingerprint | None = None) -> list:
    """Load registered concepts onto a pipeline (each checked for fit); returns them bound for prompts."""
    import dataclasses

    from persres.tokens import BoundConcept

    fp = fp or fingerprint(families.denoiser(pipe))  # once for all packs
    bound = []
    for name in names:
        tensors, meta = registry.load(name)
        meta = dataclasses.replace(meta, name=name)
        apply_pack(pipe, tensors, meta, model, fp)
        bound.append(BoundConcept(name, meta.identifier, meta.class_word, everywhere=meta.everywhere))
    return bound
