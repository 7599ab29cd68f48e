"""The two benchmarks end to end, as the CLI runs them: options in, rows and written files out.

`bench_customconcept101`: the paper's protocol on CustomConcept101 (train, sample with and
without LAG, CLIP/DINO scores; shards over launched processes). `bench_toy`: the toy world's
concepts, trained once per config and scored by the toy checker. Both report progress
through a `Reporter` the caller supplies (the CLI's is a Rich bar), never print themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from persres.config import MultiLagConfig, SampleConfig
from persres.errors import InputError


class Reporter(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def describe(self, text: str) -> None: ...


class Silent:
    def start(self, total: int) -> None: pass
    def advance(self, n: int = 1) -> None: pass
    def describe(self, text: str) -> None: pass


@dataclass
class BenchReport:
    rows: list[dict]
    summary: object  # per benchmark: {"overall": ..., "by_category": ...} or a list of summary rows
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the caller should say (an optional dependency missing, ...)


LAG_MODES = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}


def bench_customconcept101(registry, *, root: Path, concepts: int | None = None, concept: tuple[str, ...] = (), multiconcept: bool = False,
                           samples_per_prompt: int = 50, prompts_per_concept: int = 20, lag: str = "both", out: Path = Path("bench-cc101"),
                           model: str | None = None, steps: int = 50, guidance: float = 6.0, train_steps: int | None = None,
                           clip: str = "openai/clip-vit-base-patch32", dino: str = "facebook/dino-vits16", device: str = "auto",
                           precision: str = "auto", reporter: Reporter = Silent(), workspace=None) -> BenchReport | None:
    """Train, sample and score; None on a launched process other than rank 0 (rank 0 reports)."""
    from persres.eval.bench import BenchConfig, run_bench, summarize, work_units
    from persres.eval.cc101 import load_concepts, load_pairs, select
    from persres.eval.metrics import Scorer
    from persres.scale import cluster
    from persres.workspace import Workspace

    modes = LAG_MODES.get(lag)
    if modes is None:
        raise InputError(f"--lag must be both, on or off, got {lag!r}")
    if samples_per_prompt <= 0 or prompts_per_concept <= 0:
        raise InputError("--samples-per-prompt and --prompts-per-concept must be positive")
    ws = workspace or Workspace(model, registry=registry, device=device, precision=precision)
    chosen = select(load_concepts(root), list(concept), concepts)
    keys = {c.key for c in chosen}
    pairs = [p for p in load_pairs(root) if {p.first.key, p.second.key} <= keys] if multiconcept else []
    with cluster(device) as here:
        if here.multi_node:
            raise InputError("bench customconcept101 shards over one machine's processes (they share its registry); "
                             "across machines, train the packs with `persres train-many --shards` first")
        ws.device = here.device if here.state is not None else ws.device
        cfg = BenchConfig(out=out, modes=modes, prompts_per_concept=prompts_per_concept, samples_per_prompt=samples_per_prompt,
                          sample=SampleConfig(steps=steps, guidance=guidance),
                          train=ws.train_config({"steps": train_steps, "device": device, "precision": precision}),
                          model=ws.model, clip=clip, dino=dino)
        scorer = Scorer(clip, dino, here.device)
        reporter.start(len(here.split(range(work_units(chosen, pairs, cfg)))))  # this process's share
        rows = run_bench(chosen, pairs, cfg, scorer, ws, cluster=here, log=lambda m: reporter.describe(m[:60]), advance=reporter.advance)
        if not here.main:
            return None
    notes = [] if any(p.name == "figure.png" for p in cfg.written) else ["figure.png not drawn: matplotlib is not installed (pip install matplotlib)"]
    return BenchReport(rows, summarize(rows), cfg.written, notes)


def bench_toy(registry, *, quick: bool = False, concept: tuple[str, ...] = (), concept_set: tuple[str, ...] = (), out: Path = Path("bench-toy"),
              model: str | None = None, steps: int = 50, guidance: float = 6.0, samples: int | None = None, seeds: int | None = None,
              singles: bool = True, pairs: bool = True, category: tuple[str, ...] = (), pair_method: tuple[str, ...] = (),
              train: dict | None = None, strength: float = 1.0, multi: dict | None = None, precision: str = "auto",
              class_words: str = "given", reporter: Reporter = Silent(), workspace=None) -> BenchReport:
    """Train (or reuse) the toy concepts' packs, sample and score every category; `train`: TrainConfig
    overrides (None values skipped), `multi`: MultiLagConfig overrides for several concepts."""
    from persres.tokens import check_strength
    from persres.toy.bench import ToyBenchConfig, prepare_concepts, run_toy_bench, select_concepts, summarize
    from persres.workspace import Workspace

    if class_words not in ("given", "suggested"):
        raise InputError(f"--class-words must be given or suggested, got {class_words!r}")
    for option, value in (("--samples", samples), ("--seeds", seeds)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be at least 1, got {value}")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    strength = check_strength(strength, "--strength")
    names = select_concepts(list(concept), list(concept_set))
    multi_config = MultiLagConfig(**{k: v for k, v in (multi or {}).items() if v is not None})
    ws = workspace or Workspace(model, registry=registry, device="cpu", precision=precision)
    config = ws.train_config({**(train or {}), "precision": precision})
    cfg = ToyBenchConfig(samples=samples or (2 if quick else 8), seeds=tuple(range(seeds or (1 if quick else 2))), quick=quick,
                         singles=singles, pairs=pairs, categories=tuple(category) or None,
                         pair_methods=tuple(pair_method) or ("base", "summed", "lag"),
                         sample=SampleConfig(steps=steps, guidance=guidance, multi=multi_config), strength=strength)
    pipe = ws.pipeline("cpu", precision)
    out.mkdir(parents=True, exist_ok=True)
    reporter.describe("training the toy concepts (reused when already trained with this config)")
    loaded = prepare_concepts(ws, names, config, class_words)
    meta = {"class_words": class_words, "class_word_of": {n: c.bound.class_word for n, c in loaded.items()},
            "train": config.to_dict(), "model": ws.model, "multi_lag": dataclasses.asdict(multi_config), "samples": cfg.samples,
            "seeds": list(cfg.seeds), "quick": quick, "sample_steps": steps, "guidance": guidance, "strength": cfg.strength,
            "sample_dtype": str(pipe.unet.dtype).removeprefix("torch.")}
    rows = run_toy_bench(pipe, loaded, out, cfg, log=lambda m: reporter.describe(f"sampling and scoring: {m}"), meta=meta)
    written = [out / "results.csv", out / "results.json", out / "references.png", *sorted(out.glob("grid-*.png"))]
    return BenchReport(rows, summarize(rows), [p for p in written if p.exists()])
