"""LAG: localized attention-guided sampling (Ham et al., Sec. 3.3), for one or several concepts.

In transformer block i, at every denoising step, the cross-attention probabilities of a
concept's tokens (identifier and class word) are summed over the tokens and averaged over
heads, binarized at their median (M_i), and the block's output projection becomes

    f_i(x) = W_i x + M_i * (Delta W_i x)

The maps come from the cross-attention of the same UNet evaluation (attn2 of block i runs
before its proj_out), so LAG adds no model evaluation. On a diffusion transformer they come from each
single-stream block's joint attention (`persres.kernels.joint`), and the residual acts on the
image tokens only: the text positions get M = 0. Several concepts: each has its own
mask; where several masks are on, the concept with the highest max-normalized attention
wins, so regions never overlap. Which tokens, what fraction of pixels and which maps
define several concepts' regions is set by `MultiLagConfig` (measured on the toy world);
one concept always gets the paper's rule. Under classifier-free guidance the batch is made of
chunks, unconditional and conditional ([unconditional, conditional] in persres's own sampling; in
whatever order a host such as ComfyUI says), and only the conditional chunk has concept tokens:
its regions serve every chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from persres.config import MultiLagConfig, RegionTokens
from persres.kernels import Backend, attention_processors
from persres.residuals import EVERYWHERE, all_layers, transformer_blocks


@dataclass(frozen=True)
class ConceptTokens:
    """A loaded concept and the positions of its tokens in the (padded) prompt."""

    name: str
    positions: tuple[int, ...]  # identifier and class word: the paper's region tokens
    class_positions: tuple[int, ...] = ()  # the class word's alone (a subset of positions)

    def region_tokens(self, which: RegionTokens) -> tuple[int, ...]:
        """The tokens whose maps define the region; falls back to all when a role is absent."""
        if which == "class" and self.class_positions:
            return self.class_positions
        if which == "identifier":
            return tuple(p for p in self.positions if p not in self.class_positions) or self.positions
        return self.positions


def median_mask(maps: torch.Tensor) -> torch.Tensor:
    """maps: (..., N) -> bool mask, on where the value is above the (lower) median: half of N."""
    med = maps.median(dim=-1, keepdim=True).values
    return maps > med


def coverage_mask(maps: torch.Tensor, coverage: float = 0.5) -> torch.Tensor:
    """maps: (..., N) -> bool mask of the round(coverage * N) largest values; 0.5 is `median_mask`."""
    if coverage == 0.5:
        return median_mask(maps)
    n = maps.shape[-1]
    keep = max(1, min(n - 1, round(coverage * n)))
    kth = maps.kthvalue(n - keep, dim=-1, keepdim=True).values
    return maps > kth


def regions_from_maps(maps: torch.Tensor, coverage: float = 0.5, conflict: str = "normalized") -> torch.Tensor:
    """maps: (B, K, N) token-summed attention of K concepts -> disjoint regions (B, K, N) in {0, 1}.

    Where several masks are on, the winner has the highest max-normalized map ("normalized")
    or the highest attention probability itself ("raw": the pixel attends to its tokens most)."""
    on = coverage_mask(maps, coverage)  # (B, K, N)
    if maps.shape[1] == 1:
        return on.float()
    norm = maps if conflict == "raw" else maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, K, N)
    score = torch.where(on, norm, torch.full_like(norm, -1.0))
    winner = score.argmax(dim=1)  # (B, N)
    won = F.one_hot(winner, maps.shape[1]).permute(0, 2, 1).bool()  # (B, K, N)
    return (on & won).float()


class LagSession:
    """Per-call state of LAG sampling: token sets in, regions out.

    The attn2 processors `record` maps; each proj_out wrapper asks `region` for its concept, any
    other wrapped layer `layer_region`. Created and torn down by `lag_regions`, never global.
    With several concepts and `MultiLagConfig.maps == "aggregate"`, a block's regions come from
    the previous UNet evaluation's maps of every block, averaged at the latent resolution (the
    block's own maps on the first evaluation): no extra evaluation either way.

    Other layers (a community LoRA's) take the freshest regions there are: their block's own maps
    of this evaluation once its cross-attention has run, else the previous evaluation's maps of
    every block averaged at the layer's resolution; on the first evaluation a layer with neither
    does not act. Layers that read the prompt (`ResidualLayer.text`) change only the rows of the
    concept's own tokens; layers without positions (time embeddings, modulation) do not act.
    """

    def __init__(self, concepts: Sequence[ConceptTokens], guided: bool, latent_hw: tuple[int, int] | None = None,
                 keep_masks: bool = False, multi: MultiLagConfig = MultiLagConfig(), steps: int | None = None,
                 everywhere: Sequence[str] = (), layout: Sequence[bool] | None = None, image_first: bool = False):
        self.concepts = list(concepts)
        self.index = {c.name: i for i, c in enumerate(self.concepts)}
        self.everywhere = frozenset(everywhere)  # concepts that act at every position (styles)
        single = len(self.concepts) == 1  # the paper's rule, whatever `multi` says
        self.token_sets = [c.positions if single else c.region_tokens(multi.tokens) for c in self.concepts]
        self.coverage = 0.5 if single else multi.coverage
        self.conflict = multi.conflict
        self.aggregate = not single and multi.maps == "aggregate"
        # several concepts: the base model alone lays out the first `delay` of the steps
        self.delayed = 0 if single or not steps else round(multi.delay * steps)
        self.evaluation = 0  # which UNet evaluation of the call is running (0-based)
        self.step = 0  # which sampling step it belongs to (the evaluation's index unless told)
        self._started = False
        # the batch's chunks, True where conditional: [unconditional, conditional] under classifier-free guidance
        self.layout: tuple[bool, ...] = tuple(layout) if layout is not None else (False, True) if guided else (True,)
        self.image_first = image_first  # a joint sequence is [N image, T text] (else [T text, N image])
        self.latent_hw = latent_hw
        self.keep_masks = keep_masks
        self._maps: dict[str, torch.Tensor] = {}  # block -> (b, K, N), the conditional chunk's, summed over its layers
        self._hw: dict[str, tuple[int, int]] = {}  # block -> its grid (h, w)
        self._regions: dict[str, torch.Tensor] = {}  # block -> (b, K, N), from its maps so far
        self._previous: torch.Tensor | None = None  # (b, K, H, W) the previous evaluation's average over blocks
        self._previous_regions: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> (b, K, h*w)
        self.mask_sums: dict[str, torch.Tensor] = {}  # concept -> (b, h, w) summed regions, if keep_masks
        self.mask_counts = 0

    def record(self, block: str, maps: torch.Tensor) -> None:
        """maps: (B, K, N) of every chunk; the conditional chunk's are kept (an evaluation without one keeps none)."""
        if True not in self.layout:
            return
        b = maps.shape[0] // len(self.layout)  # rows per chunk
        first = self.layout.index(True)
        maps = maps[first * b : (first + 1) * b]  # (b, K, N)
        if block in self._maps:  # several transformer layers in one block: sum them
            maps = self._maps[block] + maps
        self._maps[block] = maps
        self._regions.pop(block, None)

    def begin_evaluation(self, step: int | None = None, layout: Sequence[bool] | None = None) -> None:
        """A UNet evaluation starts (`lag_regions` calls this from a forward pre-hook on the UNet; a host's
        sampler wrapper may say which step it belongs to and its batch's chunks, True where conditional):
        the maps gathered so far become the previous evaluation's. An evaluation without a conditional
        chunk (a host that runs the unconditional batch alone) takes the previous evaluation's regions."""
        if layout is not None:
            self.layout = tuple(bool(c) for c in layout)
        if self._started:
            self.end_evaluation()
            self.evaluation += 1
        self._started = True
        self.step = self.evaluation if step is None else step

    def end_evaluation(self) -> None:
        """Keep this evaluation's masks and average its maps over blocks (in the order blocks ran)."""
        total, count = None, 0
        grids = {block: self._hw.get(block) or self._split(maps.shape[-1]) for block, maps in self._maps.items()}
        size = self.latent_hw or max(grids.values(), default=(1, 1), key=lambda hw: hw[0] * hw[1])
        for block, maps in self._maps.items():
            h, w = grids[block]
            grid = F.interpolate(maps.float().view(*maps.shape[:2], h, w), size=size, mode="bilinear",
                                 align_corners=False)  # (B, K, H, W)
            total, count = (grid if total is None else total + grid), count + 1
            if self.keep_masks and self.step >= self.delayed:  # where residuals act, while they act
                self._keep(self._block_regions(block, h, w), h, w)
        if total is not None:
            self._previous = total / count
        self._maps.clear()
        self._regions.clear()
        self._previous_regions.clear()

    def _block_regions(self, block: str, h: int, w: int) -> torch.Tensor:
        regions = self._regions.get(block)
        if regions is None:
            maps = self._maps[block].float()  # (B, K, N)
            if self.aggregate and self._previous is not None and self._previous.shape[:2] == maps.shape[:2]:
                maps = F.interpolate(self._previous, size=(h, w), mode="area").flatten(2)  # (B, K, h*w)
            regions = self._regions[block] = regions_from_maps(maps, self.coverage, self.conflict)
        return regions

    def region(self, block: str, concept: str, x: torch.Tensor):
        """A proj_out's mask for the concept, shaped to broadcast against its output `x`; `EVERYWHERE`
        for a concept that acts everywhere; None where its residual does not act (no maps yet, a
        concept not in the prompt, the several-concept delay)."""
        if concept in self.everywhere:
            return EVERYWHERE
        if concept not in self.index:
            return None
        if block in self._maps:
            h, w = self._hw[block] = self._grid(x, self._maps[block].shape[-1])
        if self.step < self.delayed:
            return None  # the base model alone lays out these steps: no residual acts, none is computed
        if block not in self._maps:  # no maps of this block: an unconditional-only evaluation reads the previous one's
            return self._previous_region(self.index[concept], x) if True not in self.layout else None
        return self._shaped(self._block_regions(block, h, w)[:, self.index[concept]], x)

    def layer_region(self, layer, concept: str, x: torch.Tensor):
        """Any other layer's mask for the concept, against its output `x` (see the class doc)."""
        if concept in self.everywhere:
            return EVERYWHERE
        if concept not in self.index or self.step < self.delayed:
            return None
        k = self.index[concept]
        if layer.text:  # x: (B, T, C): the concept's own token rows, of the conditional chunk(s)
            conditional = [i for i, c in enumerate(self.layout) if c]
            if x.ndim != 3 or not conditional:  # an evaluation of the unconditional prompt alone: nothing to change
                return None
            mask = x.new_zeros(len(self.layout), x.shape[0] // len(self.layout), x.shape[1])  # (chunks, b, T)
            for chunk in conditional:
                mask[chunk, :, [p for p in self.concepts[k].positions if p < x.shape[1]]] = 1
            return mask.view(x.shape[0], x.shape[1], 1)
        if x.ndim == 4:
            h, w = x.shape[2], x.shape[3]
        elif x.ndim == 3:
            h, w = self._split(x.shape[1])
        else:
            return None  # no positions (time embeddings, modulation): its change cannot be kept to a region
        if layer.block in self._maps and self._maps[layer.block].shape[-1] == h * w:
            return self._shaped(self._block_regions(layer.block, h, w)[:, k], x)  # its block's cross-attention has run
        return self._previous_region(k, x, (h, w))  # None on the first evaluation, before any map of this resolution

    def _previous_region(self, k: int, x: torch.Tensor, hw: tuple[int, int] | None = None):
        """Concept k's region from the previous evaluation's maps of every block, at x's grid `hw`; None before any."""
        if self._previous is None:
            return None
        hw = hw or ((x.shape[2], x.shape[3]) if x.ndim == 4 else self._split(x.shape[1]))
        regions = self._previous_regions.get(hw)
        if regions is None:
            maps = F.interpolate(self._previous, size=hw, mode="area").flatten(2)  # (b, K, h*w)
            regions = self._previous_regions[hw] = regions_from_maps(maps, self.coverage, self.conflict)
        return self._shaped(regions[:, k], x)

    def _shaped(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """mask (b, N) of one chunk to broadcast against x of every chunk: (B, 1, H, W), (B, N, 1), or (B, T + N, 1)
        with 0 on the T text tokens (and on an image-first sequence's padding)."""
        if x.shape[0] != mask.shape[0]:
            mask = mask.repeat(x.shape[0] // mask.shape[0], 1)  # (B, N): the conditional chunk's for every chunk
        if x.ndim == 4:
            return mask.view(x.shape[0], 1, x.shape[2], x.shape[3])
        text = x.shape[1] - mask.shape[1]  # a joint sequence [T text, N image] or [N image, T text]: no residual on text
        if text:
            mask = F.pad(mask, (0, text) if self.image_first else (text, 0))  # (B, T+N)
        return mask.unsqueeze(-1)

    def _split(self, length: int) -> tuple[int, int]:
        """The image grid (h, w) inside a sequence of `length` positions (image tokens, or text then image)."""
        if self.latent_hw is None:
            side = int(math.isqrt(length))
            return side, length // side
        lh, lw = self.latent_hw
        factor = 1
        while True:
            h, w = -(-lh // factor), -(-lw // factor)
            if h * w <= length or (h == 1 and w == 1):
                return h, w
            factor *= 2

    def _keep(self, regions: torch.Tensor, h: int, w: int) -> None:
        out_hw = self.latent_hw or (h, w)
        grid = regions.view(regions.shape[0], regions.shape[1], h, w)  # (B, K, h, w)
        grid = F.interpolate(grid, size=out_hw, mode="nearest")
        for name, k in self.index.items():
            prev = self.mask_sums.get(name)
            self.mask_sums[name] = grid[:, k] if prev is None else prev + grid[:, k]
        self.mask_counts += 1

    def _grid(self, x: torch.Tensor, n: int) -> tuple[int, int]:
        if x.ndim == 4:
            return x.shape[2], x.shape[3]
        return self._split(n)

    def average_masks(self) -> dict[str, torch.Tensor]:
        """Each concept's region averaged over blocks and the steps its residual acts in
        (after the several-concept delay): (b, h, w) in [0, 1], one per image of the conditional chunk."""
        return {name: s / max(self.mask_counts, 1) for name, s in self.mask_sums.items()}


@contextmanager
def lag_regions(
    unet,
    concepts: Sequence[ConceptTokens],
    *,
    guided: bool,
    family=None,
    backend: Backend | str | None = None,
    latent_hw: tuple[int, int] | None = None,
    keep_masks: bool = False,
    multi: MultiLagConfig = MultiLagConfig(),
    steps: int | None = None,
    everywhere: Sequence[str] = (),
):
    """Inside the block, every residual acts only in its concept's region (one denoiser pass per step).
    `guided`: the batch holds an unconditional chunk beside the conditional one, in the order the family
    puts them (`Family.batch_layout`); `family`: the denoiser's (detected from its config when not
    given), whose attention processors hand the maps over."""
    from persres import families

    family = family or families.of_config(unet.config)
    session = LagSession(concepts, guided, latent_hw, keep_masks, multi, steps, everywhere,
                         layout=family.batch_layout(guided), image_first=family.image_first)
    layers = all_layers(unet)
    make = family.lag_processors(unet, session, backend, transformer_blocks(unet), latent_hw)
    with attention_processors(unet, make):
        for layer in layers.values():
            layer.unmerge()
            layer.regions = session
        try:
            with family.evaluations(unet, session):  # told when each evaluation starts, not inferred
                yield session
            session.end_evaluation()
        finally:
            for layer in layers.values():
                layer.regions = None
