"""Configuration dataclasses with the paper's defaults (Ham et al., CVPR 2024, Sec. 4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from persres.errors import InputError

SEED_LIMIT = 2**63  # torch generators take seeds in [0, 2**64); one image per seed from seed to seed + n - 1
MAX_SIDE = 4096  # pixels: beyond this a Stable Diffusion UNet runs out of memory everywhere
MAX_IMAGES = 10_000  # per gen call (sampled in batches)


def _number(name: str, value, kind: type = float, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    """Type and range of one option; InputError naming it otherwise."""
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise InputError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise InputError(f"{name} must be <= {high:g}, got {value!r}")


Precision = Literal["auto", "fp32", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Init = Literal["zero", "random"]
LrSchedule = Literal["constant", "cosine"]
RegionTokens = Literal["identifier+class", "class", "identifier"]
MapSource = Literal["block", "aggregate"]


@dataclass(frozen=True)
class MultiLagConfig:
    """How LAG finds regions when several concepts share a prompt.

    One concept always follows the paper exactly (its identifier and class tokens, each
    block's own maps, the median). With several, these choices apply; their defaults are
    the ones measured best on the toy tuning pairs (`benchmarks/toy_seeds.py pairs --lag`;
    README: "Two concepts in one picture").
    """

    tokens: RegionTokens = "identifier+class"  # which of a concept's tokens define its region
    coverage: float = 0.5  # fraction of a block's pixels in each concept's mask (0.5: the median)
    maps: MapSource = "aggregate"  # the previous evaluation's maps of all blocks, or each block's own ("block")
    delay: float = 0.2  # fraction of the denoising steps the base model runs alone (lays out every object) before the residuals act
    conflict: str = "normalized"  # where masks overlap: highest max-normalized map, or "raw" attention wins

    def __post_init__(self) -> None:
        if self.tokens not in ("identifier+class", "class", "identifier"):
            raise InputError(f"LAG region tokens must be identifier+class, class or identifier, got {self.tokens!r}")
        if not (isinstance(self.coverage, (int, float)) and 0 < self.coverage < 1):
            raise InputError(f"LAG coverage must be in (0, 1), got {self.coverage!r}")
        if self.maps not in ("block", "aggregate"):
            raise InputError(f"LAG maps must be block or aggregate, got {self.maps!r}")
        if not (isinstance(self.delay, (int, float)) and 0 <= self.delay < 1):
            raise InputError(f"LAG delay must be in [0, 1), got {self.delay!r}")
        if self.conflict not in ("normalized", "raw"):
            raise InputError(f"LAG conflict rule must be normalized or raw, got {self.conflict!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 150  # paper: 150 iterations
    batch_size: int = 4  # paper: batch size 4
    lr: float = 1e-3  # paper: learning rate 1e-3
    lr_schedule: LrSchedule = "constant"  # paper: none named; "cosine" decays it to 0 over the steps
    rank_ratio: float = 0.05  # paper: r_i = 0.05 m_i
    rank: int | None = None  # fixed rank for every block; overrides rank_ratio
    resolution: int | None = None  # None: the base model's own sample size
    seed: int = 0
    init: Init = "zero"  # A = 0, B random: starts exactly at the base model (paper: both random)
    prompt: str = "a photo of a {identifier} {class_word}"  # paper: "a photo of a [V] [class]"
    flip: bool = True  # horizontally flipped copies of the references as extra cached latents
    snr_gamma: float | None = None  # min-SNR-γ loss weights (Hang et al. 2023); None: plain MSE (paper)
    scale_min: float = 1.0  # zoom-out views: references shrunk to [scale_min, 1) at random places, loss on the image only; 1: off (paper)
    gradient_checkpointing: bool = False  # for small GPUs: trades compute for memory
    device: Device = "auto"
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        _number("--steps", self.steps, int, 1, 1_000_000)
        _number("--batch-size", self.batch_size, int, 1, 1024)
        _number("--lr", self.lr, float, 0, 1, low_open=True)
        if self.rank is not None:
            _number("--rank", self.rank, int, 1, 1 << 16)
        _number("--rank-ratio", self.rank_ratio, float, 0, 1, low_open=True)
        if self.resolution is not None:
            _number("--resolution", self.resolution, int, 8, MAX_SIDE)
            if self.resolution % 8:
                raise InputError(f"--resolution must be a multiple of 8, got {self.resolution}")
        _number("--seed", self.seed, int, 0, SEED_LIMIT - 1)
        _number("--scale-min", self.scale_min, float, 0.25, 1)
        if self.snr_gamma is not None:
            _number("--snr-gamma", self.snr_gamma, float, 0, low_open=True)
        for name in ("flip", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise InputError(f"--precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if not isinstance(self.prompt, str):
            raise InputError(f"the training prompt must be text, got {self.prompt!r}")
        if "{identifier}" not in self.prompt or "{class_word}" not in self.prompt:
            raise InputError(f"the training prompt must contain {{identifier}} and {{class_word}}, got {self.prompt!r}")
        if self.init not in ("zero", "random"):
            raise InputError(f"init must be 'zero' or 'random', got {self.init!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")

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
        _number("--steps", self.steps, int, 1, 1000)  # 1000: the training timesteps of every SD scheduler
        _number("--guidance", self.guidance, float, 0, 100)
        _number("--eta", self.eta, float, 0, 1)
        _number("-n", self.num_images, int, 1, MAX_IMAGES)
        _number("--seed", self.seed, int, 0, SEED_LIMIT - self.num_images)
        for name, side in (("--height", self.height), ("--width", self.width)):
            if side is not None:
                _number(name, side, int, 8, MAX_SIDE)
                if side % 8:
                    raise InputError(f"{name} must be a multiple of 8, got {side}")

    def replace(self, **changes) -> "SampleConfig":
        return dataclasses.replace(self, **changes)
