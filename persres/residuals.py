"""Personalized residuals on the denoiser's transformer output projections (Ham et al., Sec. 3.2).

For transformer block i with output projection W_i (m_i x n_i: a square 1x1 Conv2d or Linear
on a UNet, a Linear from attention and MLP features, n_i = 5 m_i, in a diffusion transformer's
single-stream block; `persres.families` says which blocks) a concept learns Delta W_i = A_i B_i, A_i in R^{m_i x r_i},
B_i in R^{r_i x n_i}. `ResidualProjOut` replaces `proj_out` in place (the module keeps the
original as `base_layer`, like peft's LoraLayer) and holds one factor pair per concept:

    f(x) = W x + sum_k M_k * (A_k B_k x)         M_k = 1 without LAG, a region mask with LAG

Without LAG the residuals are folded into W (`merge`), so sampling costs exactly what the
base model costs; `unmerge` restores the original weight bit for bit from a saved copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from persres.errors import InputError
from persres.names import parameter_count  # noqa: F401  (re-exported: residuals.parameter_count)

if TYPE_CHECKING:
    from persres.config import Init



EVERYWHERE = "everywhere"  # what a RegionSource answers for a concept that acts at every position (a style)


class RegionSource(Protocol):
    """What a wrapper asks during LAG sampling (see `persres.lag.LagSession`): the concept's mask,
    `EVERYWHERE`, or None where its change acts nowhere (then it is not computed at all).
    `region` serves a block's proj_out (the paper's rule), `layer_region` any other layer."""

    def region(self, block: str, concept: str, x: torch.Tensor): ...

    def layer_region(self, layer: "ResidualLayer", concept: str, x: torch.Tensor): ...


def rank_for(channels: int, rank_ratio: float = 0.05, rank: int | None = None) -> int:
    """The residual rank of a block with `channels` channels (paper: r = 0.05 m)."""
    if rank is not None:
        return min(rank, channels)
    return max(1, min(channels, round(rank_ratio * channels)))


def shape_of(layer: nn.Module) -> tuple[int, int]:
    """(out, in) features of a proj_out: a 1x1 Conv2d must be square, a Linear may not be."""
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.in_channels != layer.out_channels:
            raise InputError(f"proj_out must be a square 1x1 Conv2d, got {layer}")
        return layer.out_channels, layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    raise InputError(f"unsupported proj_out layer {type(layer).__name__}")


def layer_shape(layer: nn.Module) -> tuple[int, ...]:
    """(out, in) of a Linear, (out, in, kh, kw) of a Conv2d: the shape of its Delta W."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros":
        return layer.out_channels, layer.in_channels, *layer.kernel_size
    raise InputError(f"a low-rank change applies to a Linear or an ungrouped Conv2d, not {layer}")


def channels_of(layer: nn.Module) -> int:
    """A proj_out's output channels m (what the rank rule reads)."""
    return shape_of(layer)[0]


class LowRankResidual(nn.Module):
    """Delta W = up @ down, up: (m, r), down: (r, n) or, on a k x k convolution, (r, n, kh, kw)
    (a convolution with the layer's kernel, stride and padding, then a 1x1 one: LoCon's form);
    n = m unless `in_channels` says otherwise. Kept in fp32 whatever the model's dtype."""

    def __init__(self, channels: int, rank: int, init: "Init" = "zero", generator: torch.Generator | None = None,
                 in_channels: int | None = None, kernel: tuple[int, int] | None = None):
        super().__init__()
        n = in_channels or channels
        down = torch.randn(rank, n, *(kernel or ()), generator=generator) / rank**0.5
        up = torch.zeros(channels, rank) if init == "zero" else torch.randn(channels, rank, generator=generator) / channels**0.5
        self.up = nn.Parameter(up)  # A_i: (m, r)
        self.down = nn.Parameter(down)  # B_i: (r, n) or (r, n, kh, kw)

    def delta_weight(self) -> torch.Tensor:
        return self.up @ self.down.flatten(1)  # (m, n) or (m, n * kh * kw)

    def forward(self, x: torch.Tensor, conv: nn.Conv2d | None) -> torch.Tensor:
        return up_product(down_product(x, self.down.to(x.dtype), conv), self.up.to(x.dtype), conv)


def down_product(x: torch.Tensor, down: torch.Tensor, conv: nn.Conv2d | None) -> torch.Tensor:
    """B x, the low-rank code: x (..., n) -> (..., r); on a convolution x (B, n, H, W) -> (B, r, H', W'),
    with the layer's stride, padding and dilation."""
    if conv is None:
        return F.linear(x, down)
    return F.conv2d(x, down if down.ndim == 4 else down[:, :, None, None], stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation)


def up_product(code: torch.Tensor, up: torch.Tensor, conv: nn.Conv2d | None) -> torch.Tensor:
    """A code: (..., r) -> (..., m); on a convolution a 1x1 one, (B, r, H, W) -> (B, m, H, W)."""
    return F.linear(code, up) if conv is None else F.conv2d(code, up[:, :, None, None])


class ResidualLayer(nn.Module):
    """A Linear or Conv2d with per-concept low-rank changes (the module keeps the original as
    `base_layer`, like peft's LoraLayer):

        f(x) = W x + sum_k s_k M_k * (A_k B_k x)

    `block`: the residual-carrying block the layer sits in ("" outside any), whose regions LAG
    reads; `text`: the layer reads the prompt's tokens, not image positions (cross-attention
    keys and values, a joint block's text stream, a text encoder)."""

    def __init__(self, base_layer: nn.Module, block: str = "", text: bool = False, path: str = ""):
        super().__init__()
        self.shape = layer_shape(base_layer)  # (m, n[, kh, kw])
        self.channels, self.in_channels = self.shape[0], self.shape[1]
        self.base_layer = base_layer
        self.block = block
        self.text = text
        self.path = path  # the layer's module path inside its component
        self.residuals = nn.ModuleDict()
        self.merged: list[str] = []
        self.regions: RegionSource | None = None  # set only inside persres.lag.lag_regions()
        self.active: tuple[str, ...] | None = None  # None: every loaded concept; set by use_concepts()
        self.strengths: dict[str, float] = {}  # scale per concept, 1 where absent; set by use_concepts()
        self._original_weight: torch.Tensor | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def __getattr__(self, name: str):
        """What the wrapped layer has (in_features, stride, ...): pipelines read them off the module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def add(self, name: str, residual: LowRankResidual) -> None:
        if name in self.residuals:
            raise InputError(f"concept {name!r} is already loaded on {self.block or self.path}")
        self.residuals[name] = residual.to(self.weight.device)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge()
        del self.residuals[name]

    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold the named residuals (all by default) into the base weight."""
        names = [n for n in (self.residuals if names is None else names) if n in self.residuals and n not in self.merged]
        if not names:
            return
        w = self.weight
        if self._original_weight is None:
            self._original_weight = w.detach().clone()
        with torch.no_grad():
            delta = sum(self.strengths.get(n, 1.0) * self.residuals[n].delta_weight() for n in names)  # (m, n[*kh*kw]), fp32
            merged = w.detach().float().view(self.channels, -1) + delta.to(w.device)
            w.copy_(merged.view_as(w).to(w.dtype))
        self.merged.extend(names)

    def unmerge(self) -> None:
        """Restore the original weight exactly (from the saved copy, not by subtraction)."""
        if self._original_weight is not None:
            with torch.no_grad():
                self.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged = []

    def region(self, name: str, x: torch.Tensor):
        return self.regions.layer_region(self, name, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        acting = []  # (up, down, strength, mask or None)
        for name, residual in self.residuals.items():
            if name in self.merged or (self.active is not None and name not in self.active):
                continue
            mask = None
            if self.regions is not None:  # LAG: (B, 1, H, W), (B, N, 1) or (B, T + N, 1); None: acts nowhere now
                mask = self.region(name, out)
                if mask is None:
                    continue  # this residual acts nowhere now: not computed
            acting.append((residual.up, residual.down, self.strengths.get(name, 1.0), None if mask is EVERYWHERE else mask))
        if acting:
            out = out + residual_sum(x, acting, self.base_layer if self.is_conv else None)
        return out


def residual_sum(x: torch.Tensor, acting, conv: nn.Conv2d | None) -> torch.Tensor:
    """Σ_k s_k M_k ⊙ (A_k B_k x) for `acting` = [(A (m, r), B (r, n[, kh, kw]), s, M or None)], M broadcast
    against the layer's output. Several as two products: every B_k at once, each mask and strength on
    its r_k columns (a position's mask scales its whole low-rank code), every A_k at once."""
    if len(acting) == 1:
        up, down, strength, mask = acting[0]
        delta = up_product(down_product(x, down.to(x.dtype), conv), up.to(x.dtype), conv)
        if strength != 1.0:
            delta = delta * strength
        return delta if mask is None else delta * mask.to(x.dtype)
    downs = torch.cat([down for _, down, _, _ in acting]).to(x.dtype)  # (Σr, n[, kh, kw])
    ups = torch.cat([up for up, _, _, _ in acting], dim=1).to(x.dtype)  # (m, Σr)
    code = down_product(x, downs, conv)  # (..., Σr) or (B, Σr, H', W')
    dim = 1 if conv is not None else -1
    parts = code.split([up.shape[1] for up, _, _, _ in acting], dim=dim)
    scaled = []
    for part, (_, _, strength, mask) in zip(parts, acting):
        if mask is not None:
            part = part * mask.to(x.dtype)
        scaled.append(part * strength if strength != 1.0 else part)
    return up_product(torch.cat(scaled, dim=dim), ups, conv)


class ResidualProjOut(ResidualLayer):
    """A transformer block's output projection with per-concept residuals (the paper's layer; `proj_out`
    on a UNet, the family's `projection` on a diffusion transformer): its LAG mask comes from its own
    block's attention of the same evaluation."""

    def __init__(self, base_layer: nn.Module, block: str, projection: str = "proj_out"):
        shape_of(base_layer)  # a square 1x1 Conv2d or a Linear
        super().__init__(base_layer, block, path=f"{block}.{projection}")

    def region(self, name: str, x: torch.Tensor):
        return self.regions.region(self.block, name, x)


@contextmanager
def use_concepts(unet: nn.Module, names: Sequence[str], merged: bool, strengths: Mapping[str, float] | None = None):
    """Inside the block only `names` act, each scaled by its strength (1 where `strengths` has
    none); `merged=True` folds them into the weights (no extra cost)."""
    layers = all_layers(unet)
    missing = [n for n in names if not any(n in layer.residuals for layer in layers.values())]
    if missing:
        raise InputError(f"concept {missing[0]!r} is not loaded on this UNet")
    before = {block: (layer.active, list(layer.merged), layer.strengths) for block, layer in layers.items()}
    for layer in layers.values():
        layer.unmerge()
        layer.active = tuple(names)
        layer.strengths = {n: float(s) for n, s in (strengths or {}).items() if n in names}
        if merged:
            layer.merge(names)
    try:
        yield
    finally:  # as it was before the block (blocks nest)
        for block, layer in layers.items():
            layer.unmerge()
            layer.active, was_merged, layer.strengths = before[block]
            layer.merge([n for n in was_merged if n in layer.residuals])


def all_layers(model: nn.Module) -> dict[str, ResidualLayer]:
    """Every wrapper in `model` (proj_out residuals and any other layer's), by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ResidualLayer)}


def transformer_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """Every block whose output projection carries residuals, by name, as the denoiser's family says
    (`persres.families`: a UNet's Transformer2DModels, a diffusion transformer's blocks)."""
    from persres import families

    return families.of_config(unet.config).blocks(unet)


def projection_name(unet: nn.Module) -> str:
    """Where a block keeps its output projection, relative to the block ("proj_out" on a UNet)."""
    from persres import families

    return families.of_config(unet.config).projection


def projections(unet: nn.Module) -> dict[str, nn.Module]:
    """Every block's output projection (the residual's layer, wrapped or not), by block name."""
    where = projection_name(unet)
    return {name: block.get_submodule(where) for name, block in transformer_blocks(unet).items()}


def _put_projection(block: nn.Module, where: str, module: nn.Module) -> None:
    parent, _, attr = where.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, module)


def inject(unet: nn.Module) -> dict[str, ResidualProjOut]:
    """Replace every block's output projection with a `ResidualProjOut` (idempotent)."""
    where = projection_name(unet)
    layers = {}
    for name, block in transformer_blocks(unet).items():
        layer = block.get_submodule(where)
        if not isinstance(layer, ResidualProjOut):
            layer = ResidualProjOut(layer, name, where)
            _put_projection(block, where, layer)
        layers[name] = layer
    if not layers:
        raise InputError("the UNet has no transformer blocks with a proj_out")
    return layers


def layers_of(unet: nn.Module) -> dict[str, ResidualProjOut]:
    """The injected wrappers, by transformer name (empty when none are injected)."""
    return {n: layer for n, layer in projections(unet).items() if isinstance(layer, ResidualProjOut)}


def remove(unet: nn.Module) -> None:
    """Put the original projections back, unmerged: the denoiser is the base model again."""
    where = projection_name(unet)
    for block in transformer_blocks(unet).values():
        layer = block.get_submodule(where)
        if isinstance(layer, ResidualProjOut):
            layer.unmerge()
            _put_projection(block, where, layer.base_layer)


def ranks_for(unet: nn.Module, rank_ratio: float = 0.05, rank: int | None = None) -> dict[str, int]:
    """The rank of every transformer block's residual (one place for this decision)."""
    return {name: rank_for(channels_of(base_layer_of(layer)), rank_ratio, rank) for name, layer in projections(unet).items()}


def base_layer_of(layer: nn.Module) -> nn.Module:
    return layer.base_layer if isinstance(layer, ResidualLayer) else layer


def new_concept(
    unet: nn.Module, name: str, ranks: Mapping[str, int], init: "Init" = "zero", seed: int = 0
) -> dict[str, LowRankResidual]:
    """Add fresh trainable factors for `name` on every block; returns them by block name."""
    layers = inject(unet)
    gen = torch.Generator().manual_seed(seed)
    residuals = {}
    for block, layer in layers.items():
        residual = LowRankResidual(layer.channels, ranks[block], init, gen, layer.in_channels)
        layer.add(name, residual)
        residuals[block] = layer.residuals[name]
    return residuals


def load_concept(unet: nn.Module, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load factors from a pack's tensors ("{block}.up", "{block}.down") onto the UNet."""
    layers = inject(unet)
    for block, layer in layers.items():
        up, down = tensors[f"{block}.up"], tensors[f"{block}.down"]
        residual = LowRankResidual(layer.channels, down.shape[0], in_channels=layer.in_channels)
        with torch.no_grad():
            residual.up.copy_(up)
            residual.down.copy_(down)
        residual.requires_grad_(False)
        layer.add(name, residual)


def concept_tensors(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A concept's factors as the flat tensor dict a pack stores."""
    out = {}
    for block, layer in layers_of(unet).items():
        residual = layer.residuals[name]
        out[f"{block}.up"] = residual.up.detach().float().cpu().contiguous()
        out[f"{block}.down"] = residual.down.detach().float().cpu().contiguous()
    return out


def unload_concept(unet: nn.Module, name: str) -> None:
    for layer in layers_of(unet).values():
        if name in layer.residuals:
            layer.remove(name)


def loaded_concepts(unet: nn.Module) -> list[str]:
    """Every concept on the model's proj_out residuals or any other wrapped layer."""
    names: list[str] = []
    for layer in all_layers(unet).values():
        names.extend(n for n in layer.residuals if n not in names)
    return names


def block_channels(unet: nn.Module) -> dict[str, int]:
    """Each block's proj_out output channels m."""
    return {name: channels_of(base_layer_of(layer)) for name, layer in projections(unet).items()}


def block_in_channels(unet: nn.Module) -> dict[str, int]:
    """Each block's proj_out input features n where they differ from m (a single-stream block's); {} on a UNet."""
    shapes = {name: shape_of(base_layer_of(layer)) for name, layer in projections(unet).items()}
    return {name: n for name, (m, n) in shapes.items() if n != m}


def proj_out_kind(unet: nn.Module) -> str:
    kinds = {type(base_layer_of(layer)).__name__ for layer in projections(unet).values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"
