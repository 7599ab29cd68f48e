"""`persres bench customconcept101`: train, sample, score and compare, resumably.

Layout under --out:
    {concept}/{mode}/{prompt:03d}-{sample:03d}.png   samples (PNG metadata: prompt, seed, ...)
    {concept}/{mode}/scores.json                      that folder's CLIP-T / CLIP-I / DINO-I
    results.csv, results.json, figure.png             per concept and overall, Figure-7 style
Every unit of work (a pack, an image, a score) is skipped when its result already exists,
so an interrupted bench picks up where it stopped. Sample j of prompt i uses seed
1000 i + j in every mode, so methods are compared on the same noise.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from persres.generation import generation_metadata
from persres.config import SampleConfig, TrainConfig
from persres.atomic import atomic_path
from persres.errors import InputError
from persres.eval.cc101 import CC101Concept, CC101Pair
from persres.eval.folder import eval_folder
from persres.images import save_png
from persres.settings import digest_name
from persres.tokens import expand_prompt

# Table 1 of Ham et al. (CVPR 2024), CustomConcept101.
PAPER_POINTS = {
    "paper: residuals": {"clip_t": 0.7193, "clip_i": 0.7594, "dino_i": 0.5671},
    "paper: residuals + LAG": {"clip_t": 0.7220, "clip_i": 0.7424, "dino_i": 0.5411},
}
METRICS = ("clip_t", "clip_i", "dino_i")

Log = Callable[[str], None]
Advance = Callable[[int], None]  # prompts sampled (or found done)


@dataclass
class BenchConfig:
    out: Path
    modes: tuple[str, ...] = ("off", "on")  # LAG off / on
    prompts_per_concept: int = 20  # paper: 20 prompts per concept
    samples_per_prompt: int = 50  # paper: 50 samples per prompt
    sample: SampleConfig = field(default_factory=SampleConfig)  # paper: DDIM 50, eta 0, guidance 6
    train: TrainConfig = field(default_factory=TrainConfig)
    model: str = ""
    clip: str = ""
    dino: str = ""
    written: list[Path] = field(default_factory=list)  # the result files, once written


def pack_name(concept: CC101Concept, train: TrainConfig, model: str, weights: str) -> str:
    """One pack per (concept, training config, base model and its weights): reused when all match."""
    return digest_name("cc101", concept.key, train, model, weights)


def train_packs(concepts: Sequence[CC101Concept], cfg: BenchConfig, ws, cluster, log: Log) -> dict[str, str]:
    """{concept key: pack name}: every pack the bench needs, trained once each (split by concept
    between processes; identifiers planned by rank 0 in concept order, as one process would)."""
    from persres.manifest import Row
    from persres.train_many import train_many

    for c in concepts:
        if not c.images_dir.is_dir():
            raise InputError(f"images of {c.key!r} not found at {str(c.images_dir)!r}: download the benchmark images (see its README)")
    weights = ws.base_weights()
    rows = [Row(i, 0, str(c.images_dir), pack_name(c, cfg.train, cfg.model, weights), c.class_word, config=cfg.train)
            for i, c in enumerate(concepts)]
    results = train_many(rows, model=ws.model, registry=ws.registry, cluster=cluster, log=log, workspace=ws)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise InputError(f"training {failed[0].name} failed: {failed[0].message}")
    return {c.key: row.name for c, row in zip(concepts, rows)}


@dataclass(frozen=True)
class Folder:
    """One sampled and scored folder: a concept (or pair) in one LAG mode."""

    path: Path
    names: tuple[str, ...]  # pack names
    prompts: tuple[str, ...]
    lag: bool
    references: tuple[Path, ...]
    concept: str
    category: str
    mode: str


def sample_prompt(folder: Folder, i: int, cfg: BenchConfig, ws, loaded: list) -> bool:
    """Sample prompt i of a folder unless all its images exist; `loaded` holds the concepts now on `pipe` (bound)."""
    from persres import residuals
    from persres.sample import generate

    if all((folder.path / f"{i:03d}-{j:03d}.png").exists() for j in range(cfg.samples_per_prompt)):
        return False
    if [c.name for c in loaded] != list(folder.names):
        residuals.remove(ws.pipeline().unet)
        loaded[:] = ws.apply_concepts(list(folder.names))
    prompt = folder.prompts[i]
    expanded, concepts = expand_prompt(prompt, loaded, lambda n: ws.registry.get(n).bound())
    config = cfg.sample.replace(lag=folder.lag, seed=1000 * i, num_images=cfg.samples_per_prompt)
    result = generate(ws.pipeline(), expanded, concepts, config)
    for j, (image, seed) in enumerate(zip(result.images, result.seeds)):
        save_png(image, folder.path / f"{i:03d}-{j:03d}.png", generation_metadata(prompt, expanded, seed, concepts, config, cfg.model))
    return True


def score_folder(folder: Path, reference_dirs: list[Path], scorer, log: Log) -> dict:
    path = folder / "scores.json"
    if path.exists():
        return json.loads(path.read_text())
    scores = eval_folder(folder, reference_dirs, scorer).to_dict()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(scores, indent=2))
    log(f"{folder.parent.name}/{folder.name}: scored {scores}")
    return scores


def mode_name(mode: str) -> str:
    return "lag" if mode == "on" else "nolag"


def folders_of(concepts: Sequence[CC101Concept], pairs: Sequence[CC101Pair], packs: dict[str, str], cfg: BenchConfig) -> list[Folder]:
    out = []
    for c in concepts:
        for mode in cfg.modes:
            out.append(Folder(cfg.out / c.key / mode_name(mode), (packs[c.key],), tuple(c.prompts(cfg.prompts_per_concept)),
                              mode == "on", (c.images_dir,), c.key, c.category, mode))
    for pair in pairs:
        for mode in cfg.modes:
            out.append(Folder(cfg.out / pair.key / mode_name(mode), (packs[pair.first.key], packs[pair.second.key]),
                              tuple(pair.prompts(cfg.prompts_per_concept)), mode == "on",
                              (pair.first.images_dir, pair.second.images_dir), pair.key, "multi", mode))
    return out


def run_bench(
    concepts: Sequence[CC101Concept],
    pairs: Sequence[CC101Pair],
    cfg: BenchConfig,
    scorer,
    ws,
    log: Log = lambda msg: None,
    advance: Advance = lambda n: None,
    cluster=None,
) -> list[dict]:
    """Train, sample, score; on several processes each unit (a pack, a prompt's samples, a
    folder's scores) is done by exactly one of them, and rank 0 writes the results."""
    from persres import residuals
    from persres.scale import Cluster

    cluster = cluster or Cluster()
    needed = list({c.key: c for c in [*concepts, *(m for p in pairs for m in (p.first, p.second))]}.values())
    packs = train_packs(needed, cfg, ws, cluster, log)
    folders = folders_of(concepts, pairs, packs, cfg)
    units = [(k, i) for k, f in enumerate(folders) for i in range(len(f.prompts))]  # balanced: one prompt each
    loaded: list = []
    for k, i in cluster.split(units):
        if sample_prompt(folders[k], i, cfg, ws, loaded):
            log(f"{folders[k].concept}/{folders[k].path.name}: prompt {i + 1}/{len(folders[k].prompts)} sampled")
        advance(1)
    residuals.remove(ws.pipeline().unet)
    cluster.wait()
    for k in cluster.split(range(len(folders))):
        score_folder(folders[k].path, list(folders[k].references), scorer, log)
    cluster.wait()
    rows = [{"concept": f.concept, "category": f.category, "method": f"persres {mode_name(f.mode)}",
             **json.loads((f.path / "scores.json").read_text())} for f in folders]
    if cluster.main:
        cfg.written = write_results(cfg.out, rows)
    return rows


def work_units(concepts: Sequence[CC101Concept], pairs: Sequence[CC101Pair], cfg: BenchConfig) -> int:
    """How many prompts the bench samples in all (the progress bar's total)."""
    per_mode = sum(len(c.prompts(cfg.prompts_per_concept)) for c in concepts) + sum(len(p.prompts(cfg.prompts_per_concept)) for p in pairs)
    return per_mode * len(cfg.modes)


def summarize(rows: list[dict]) -> dict:
    """Mean of each metric per method, over single concepts ("overall") and per category."""
    out: dict = {"overall": {}, "by_category": {}}
    singles = [r for r in rows if r["category"] != "multi"]
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in singles if r["method"] == method]
        if mine:
            out["overall"][method] = {m: sum(r[m] for r in mine) / len(mine) for m in METRICS}
        for cat in sorted({r["category"] for r in rows if r["method"] == method}):
            sel = [r for r in rows if r["method"] == method and r["category"] == cat]
            out["by_category"].setdefault(cat, {})[method] = {m: sum(r[m] for r in sel) / len(sel) for m in METRICS}
    return out


def write_results(out: Path, rows: list[dict]) -> list[Path]:
    """results.csv, results.json and (with matplotlib) figure.png; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    summary = summarize(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, **summary, "paper": PAPER_POINTS}, indent=2) + "\n")
    figure = plot(out / "figure.png", summary)
    return [*([out / "results.csv"] if rows else []), out / "results.json", *([figure] if figure else [])]


def plot(path: Path, summary: dict) -> Path | None:
    """Image alignment against text alignment, one point per method and category (the paper's Figure 7)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"persres nolag": "o", "persres lag": "s"}
    for ax, metric, label in ((axes[0], "clip_i", "CLIP image alignment"), (axes[1], "dino_i", "DINO image alignment")):
        for k, (cat, methods) in enumerate(sorted(summary["by_category"].items())):
            for method, v in methods.items():
                ax.scatter(v["clip_t"], v[metric], marker=markers.get(method, "^"), color=f"C{k % 10}", label=f"{cat} ({method})")
        for method, v in summary["overall"].items():
            ax.scatter(v["clip_t"], v[metric], marker=markers.get(method, "^"), s=160, facecolors="none", edgecolors="black", label=f"overall ({method})")
        for name, v in PAPER_POINTS.items():
            ax.scatter(v["clip_t"], v[metric], marker="*", s=180, color="gold", edgecolors="black", label=name)
        ax.set_xlabel("CLIP text alignment")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
