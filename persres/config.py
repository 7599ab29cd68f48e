"""Configuration dataclasses with the paper's defaults (Ham et al., CVPR 2024, Sec. 4)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from persres.errors import InputError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Init = Literal["zero", "random"]
RegionTokens = Literal["identifier+class", "class", "identifier"]
MapSource = Literal["block", "aggregate"]


@dataclass(frozen=True)
class MultiLagConfig:
    """How LAG finds regions when several concepts share a prompt.

    One concept always follows the paper exactly (its identifier and class tokens, each
    block's own maps, the median). With several, these choices apply; their defaults are
    the ones `persres bench toy` measured best (README: "Two concepts in one picture").
    """

    tokens: RegionTokens = "identifier+class"  # which of a concept's tokens define its region
    coverage: float = 0.5  # fraction of a block's pixels in each concept's mask (0.5: the median)
    maps: MapSource = "block"  # each block's own maps, or the previous evaluation's maps of all blocks

    def __post_init__(self) -> None:
        if self.tokens not in ("identifier+class", "class", "identifier"):
            raise InputError(f"LAG region tokens must be identifier+class, class or identifier, got {self.tokens!r}")
        if not (isinstance(self.coverage, (int, float)) and 0 < self.coverage < 1):
            raise InputError(f"LAG coverage must be in (0, 1), got {self.coverage!r}")
        if self.maps not in ("block", "aggregate"):
            raise InputError(f"LAG maps must be block or aggregate, got {self.maps!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 150  # paper: 150 iterations
    batch_size: int = 4  # paper: batch size 4
    lr: float = 1e-3  # paper: learning rate 1e-3
    rank_ratio: float = 0.05  # paper: r_i = 0.05 m_i
    rank: int | None = None  # fixed rank for every block; overrides rank_ratio
    resolution: int | None = None  # None: the base model's own sample size
    seed: int = 0
    init: Init = "zero"  # A = 0, B random: starts exactly at the base model (paper: both random)
    prompt: str = "a photo of a {identifier} {class_word}"  # paper: "a photo of a [V] [class]"
    flip: bool = True  # horizontally flipped copies of the references as extra cached latents
    gradient_checkpointing: bool = False  # for small GPUs: trades compute for memory
    device: Device = "auto"
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise InputError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise InputError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.rank is not None and self.rank <= 0:
            raise InputError(f"--rank must be positive, got {self.rank}")
        if not 0 < self.rank_ratio <= 1:
            raise InputError(f"--rank-ratio must be in (0, 1], got {self.rank_ratio}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise InputError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if "{identifier}" not in self.prompt or "{class_word}" not in self.prompt:
            raise InputError(f"the training prompt must contain {{identifier}} and {{class_word}}, got {self.prompt!r}")
        if self.init not in ("zero", "random"):
            raise InputError(f"init must be 'zero' or 'random', got {self.init!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50  # paper: DDIM, 50 steps
    guidance: float = 6.0  # paper: classifier-free guidance scale 6.0
    eta: float = 0.0  # paper: DDIM eta 0
    lag: bool = False
    seed: int = 0
    num_images: int = 1
    height: int | None = None  # None: the base model's own size
    width: int | None = None
    save_masks: bool = False
    multi: MultiLagConfig = MultiLagConfig()  # LAG with several concepts in one prompt

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise InputError(f"--steps must be positive, got {self.steps}")
        if self.num_images <= 0:
            raise InputError(f"-n must be positive, got {self.num_images}")
        for side in (self.height, self.width):
            if side is not None and (side <= 0 or side % 8):
                raise InputError(f"--height/--width must be positive multiples of 8, got {side}")

    def replace(self, **changes) -> "SampleConfig":
        return dataclasses.replace(self, **changes)
