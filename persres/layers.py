"""Low-rank changes on any layer of a pipeline (a community LoRA's), beside the proj_out residuals.

A layer is named as diffusers' LoRA files name it, "{component}.{module path}": component is the
denoiser ("unet", "transformer") or a text encoder ("text_encoder", "text_encoder_2"). A pack
records each layer's rank and Delta W shape (`PackMeta.layers`) and holds "{layer}.up" (m, r)
and "{layer}.down" (r, n), or (r, n, kh, kw) on a k x k convolution. Loading replaces the module
by a `residuals.ResidualLayer` that knows the residual-carrying block it sits in (whose regions
LAG reads) and whether it reads the prompt's tokens rather than image positions
(`Family.reads_text`); the wrapper is put back when the last concept on it unloads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from persres import families
from persres.errors import IncompatiblePack
from persres.names import layer_kind as kind  # noqa: F401  (layers.kind)
from persres.residuals import LowRankResidual, ResidualLayer, ResidualProjOut, layer_shape

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def components(pipe) -> dict[str, nn.Module]:
    """The pipeline's modules a LoRA may change, by the name its files give them."""
    family = families.of(pipe)
    out = {family.denoiser_folder: family.denoiser(pipe)}
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            out[name] = module
    return out


def targets(pipe) -> dict[str, tuple[int, ...]]:
    """Every layer a low-rank change can act on ("{component}.{path}" -> Delta W shape): each Linear
    and ungrouped Conv2d, wrapped or not."""
    out = {}
    for component, module in components(pipe).items():
        for path, layer in module.named_modules():
            if isinstance(layer, ResidualLayer):
                out[f"{component}.{path}"] = layer.shape
            elif isinstance(layer, (nn.Linear, nn.Conv2d)) and not path.endswith("base_layer"):
                try:
                    out[f"{component}.{path}"] = layer_shape(layer)
                except Exception:  # grouped or padded-mode convolutions: no W + A B form
                    continue
    return out


def split(key: str) -> tuple[str, str]:
    component, _, path = key.partition(".")
    return component, path


def block_of(path: str, blocks) -> str:
    """The residual-carrying block a denoiser layer sits in ("" outside every block)."""
    found = [b for b in blocks if path.startswith(b + ".")]
    return max(found, key=len) if found else ""


def _wrap(pipe, key: str, blocks) -> ResidualLayer:
    """The wrapper of layer `key` (made and put in place if there is none); `blocks`: the denoiser's residual-carrying blocks."""
    family = families.of(pipe)
    component, path = split(key)
    root = components(pipe).get(component)
    if root is None:
        raise IncompatiblePack(f"this pipeline has no {component}")
    try:
        layer = root.get_submodule(path)
    except AttributeError:
        raise IncompatiblePack(f"this model has no layer {key}") from None
    if isinstance(layer, ResidualLayer):
        return layer
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    denoiser = component == family.denoiser_folder
    block = block_of(path, blocks) if denoiser else ""
    if block and path == f"{block}.{family.projection}":  # the paper's layer: the same wrapper as persres's own residuals
        wrapper = ResidualProjOut(layer, block, family.projection)
    else:
        wrapper = ResidualLayer(layer, block, text=not denoiser or family.reads_text(path), path=path)
    setattr(parent, attr, wrapper)
    return wrapper


def check_layers(pipe, name: str, layers: Mapping[str, list[int]]) -> None:
    """IncompatiblePack unless the pipeline has every layer a concept changes, of its shape."""
    if not layers:
        return
    have = targets(pipe)
    for key, (rank, *shape) in layers.items():
        if tuple(have.get(key, ())) != tuple(shape):
            found = f"its shape is {have[key]}" if key in have else "it has no such layer"
            raise IncompatiblePack(f"concept {name!r} changes {key} of shape {tuple(shape)}, but {found} in this model")


def load_layers(pipe, name: str, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, list[int]]) -> None:
    """Put a concept's layers (`PackMeta.layers`: key -> [rank, *shape], checked by `check_layers`) onto the pipeline."""
    family = families.of(pipe)
    blocks = list(family.blocks(family.denoiser(pipe))) if layers else []
    for key, (rank, *shape) in layers.items():
        wrapper = _wrap(pipe, key, blocks)
        residual = LowRankResidual(shape[0], rank, in_channels=shape[1], kernel=tuple(shape[2:]) or None)
        with torch.no_grad():
            residual.up.copy_(tensors[f"{key}.up"])
            residual.down.copy_(tensors[f"{key}.down"])
        residual.requires_grad_(False)
        wrapper.add(name, residual)


def unload_layers(pipe, name: str) -> None:
    """Take a concept off every layer it changes; a wrapper left with none is replaced by its layer."""
    for component, root in components(pipe).items():
        for path, wrapper in list(root.named_modules()):
            if not isinstance(wrapper, ResidualLayer) or isinstance(wrapper, ResidualProjOut) or name not in wrapper.residuals:
                continue
            wrapper.remove(name)
            if not wrapper.residuals:
                wrapper.unmerge()
                parent_path, _, attr = path.rpartition(".")
                setattr(root.get_submodule(parent_path) if parent_path else root, attr, wrapper.base_layer)


def text_encoder_layers(pipe) -> dict[str, ResidualLayer]:
    """Wrapped text-encoder layers, by key."""
    return {f"{c}.{p}": m for c, root in components(pipe).items() if c in TEXT_ENCODERS
            for p, m in root.named_modules() if isinstance(m, ResidualLayer)}


def delta_norm(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """||A B||_F without forming the product."""
    up, down = up.double(), down.double().flatten(1)
    return torch.sqrt(((up.T @ up) * (down @ down.T)).sum().clamp_min(0))


class OwnTokenEncodings:
    """Under LAG, a concept's text-encoder layers act on its own tokens only: each text encoder
    whose states the denoiser reads at the region tokenizer's positions (`Family.sequence_encoders`;
    not FLUX.1's CLIP, whose pooled vector alone is read: it stays the base model's) encodes the prompt once with no concept's layers on
    and once per concept with only that concept's on, and keeps each concept's encoding at its own
    token rows (every (B, T, C) output: last and hidden states; pooled vectors stay the base
    model's). Rows of other prompts (the negative prompt) stay the base encoding. Text encoders run
    once per generation, so this costs one text-encoder run per such concept, no denoiser pass."""

    def __init__(self, pipe, concepts, prompt: str):
        self.concepts = list(concepts)  # lag.ConceptTokens of the prompt's region concepts
        self.prompt = prompt
        self.pipe = pipe
        self.handles = []

    def __enter__(self):
        for component, tokenizer_name in families.of(self.pipe).sequence_encoders:
            encoder, tokenizer = getattr(self.pipe, component, None), getattr(self.pipe, tokenizer_name, None)
            wrappers = [m for m in encoder.modules() if isinstance(m, ResidualLayer)] if isinstance(encoder, nn.Module) else []
            if not wrappers or tokenizer is None:
                continue
            ids = tokenizer(self.prompt).input_ids  # the positions are the region tokenizer's (`Family.sequence_encoders`)
            owners = [c for c in self.concepts if any(c.name in w.residuals for w in wrappers)]
            if owners:
                self.handles += self._hooks(encoder, wrappers, owners, ids)
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @staticmethod
    def _hooks(encoder, wrappers, owners, prompt_ids):
        """A pre-hook turns every concept's layers off (the call itself is the base encoding); the hook
        then encodes once per concept with its layers alone and splices its rows in."""
        before: list = []

        def only(names):
            for w in wrappers:
                w.active = names

        def pre(module, args, kwargs):
            before[:] = [w.active for w in wrappers]
            only(())

        def post(module, args, kwargs, base):
            input_ids = args[0] if args else kwargs.get("input_ids")
            try:
                for c in owners:
                    positions = [p for p in c.positions if p < input_ids.shape[1]]
                    want = torch.tensor([prompt_ids[p] for p in positions], device=input_ids.device)
                    rows = [b for b in range(input_ids.shape[0]) if torch.equal(input_ids[b, positions], want)]
                    if rows and (not before[0] or c.name in before[0]):
                        only((c.name,))
                        _splice(base, module.forward(*args, **kwargs), rows, positions)
            finally:
                for w, active in zip(wrappers, before):
                    w.active = active
            return base

        return [encoder.register_forward_pre_hook(pre, with_kwargs=True), encoder.register_forward_hook(post, with_kwargs=True)]


def _splice(base, own, rows: list[int], positions: list[int]) -> None:
    """Copy `own`'s (B, T, C) tensors into `base` at rows x positions, in place."""
    index = torch.tensor(rows)[:, None], torch.tensor(positions)[None, :]

    def each(a, b):
        if torch.is_tensor(a) and a.ndim == 3 and a.shape == b.shape:
            a[index] = b[index]
        elif isinstance(a, (tuple, list)):
            for x, y in zip(a, b):
                each(x, y)

    for key in (base.keys() if hasattr(base, "keys") else range(len(base))):
        each(base[key], own[key])
