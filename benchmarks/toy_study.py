"""Method choices measured on the toy world's *tuning* concepts (never the held-out ones).

    python -m benchmarks.toy_study training --out benchmarks/results/toy-study-training
    python -m benchmarks.toy_study lag --out benchmarks/results/toy-study-lag
    python -m benchmarks.toy_study colors --out benchmarks/results/toy-study-colors

`training`: factor init (zero / the paper's random), flip augmentation, training prompt and
lr, each against the shipped model's defaults, on identity and change-background prompts
(base / no LAG / LAG). `lag`: the multi-concept LAG choices (region tokens, coverage, map
source) on every tuning pair, with the default training. `colors`: what moves the Lab color
fidelity (median ΔE76 to the references' colors, share within ΔE 20, shape) and, in pairs with
LAG, which concept's colors each object is nearer to: the min-SNR weighting, steps, lr, and LAG's
delay, coverage, region tokens, map source and conflict rule. One process, one pipeline; each
training variant keeps its packs in its own registry under --out. Writes study.json and
prints one markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

TRAINING_VARIANTS = {
    "defaults": {},
    "init random (paper)": {"init": "random"},
    "no flip (paper)": {"flip": False},
    "paper prompt": {"prompt": "a photo of a {identifier} {class_word}"},
    "lr 1e-2": {"lr": 1e-2},
    "rank ratio 0.2": {"rank_ratio": 0.2},
    "800 steps": {"steps": 800},
    "rank ratio 0.2, 800 steps": {"rank_ratio": 0.2, "steps": 800},
    "1600 steps": {"steps": 1600},
    "rank ratio 0.2, 1600 steps": {"rank_ratio": 0.2, "steps": 1600},
    "rank ratio 0.5": {"rank_ratio": 0.5},
    "rank ratio 0.2, lr 1e-2": {"rank_ratio": 0.2, "lr": 1e-2},
    "zoom 0.5": {"scale_min": 0.5},
    "rank ratio 0.2, zoom 0.5": {"rank_ratio": 0.2, "scale_min": 0.5},
    "rank ratio 0.2, zoom 0.7": {"rank_ratio": 0.2, "scale_min": 0.7},
    "rank ratio 0.2, init random": {"rank_ratio": 0.2, "init": "random"},
    "rank ratio 0.2, no flip": {"rank_ratio": 0.2, "flip": False},
}
LAG_VARIANTS = {
    f"{tokens}, {coverage}, {maps}": {"tokens": tokens, "coverage": coverage, "maps": maps}
    for tokens in ("identifier+class", "class", "identifier")
    for coverage in (0.5, 0.3)
    for maps in ("block", "aggregate")
} | {f"paper rule, delay {d}": {"delay": d} for d in (0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7)} | {
    "raw conflict": {"conflict": "raw"},
    "raw conflict, class word": {"conflict": "raw", "tokens": "class"},
    "raw conflict, delay 0.5": {"conflict": "raw", "delay": 0.5},
}


COLOR_VARIANTS = {
    "defaults": {},
    "plain MSE": {"train": {"snr_gamma": 1e6}},  # min-SNR off: γ above every step's SNR
    "2400 steps": {"train": {"steps": 2400}},
    "lr 3e-3": {"train": {"lr": 3e-3}},
    "plain MSE, 2400 steps": {"train": {"snr_gamma": 1e6, "steps": 2400}},
    "LAG delay 0.3": {"lag": {"delay": 0.3}},
    "LAG coverage 0.3": {"lag": {"coverage": 0.3}},
    "LAG coverage 0.7": {"lag": {"coverage": 0.7}},
    "LAG delay 0.1": {"lag": {"delay": 0.1}},
    "LAG delay 0.5": {"lag": {"delay": 0.5}},
    "LAG class-word regions": {"lag": {"tokens": "class"}},
    "LAG block maps": {"lag": {"maps": "block"}},
    "LAG raw conflict": {"lag": {"conflict": "raw"}},
}


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE -> (key, value), the value read as JSON (0.2, false, null) or else kept as text."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def lifts(summary: list[dict], category: str) -> dict:
    get = {(r["category"], r["method"]): r for r in summary if r["set"] == "tuning"}
    out = {}
    for method in ("nolag-base", "lag-base"):
        r = get.get((category, method))
        if r:
            out[method] = (round(r["identity"], 3), round(r["identity_ci"], 3))
    for method in ("base", "nolag", "lag"):
        r = get.get((category, method))
        if r and "background" in r:
            out[f"background {method}"] = round(r["background"], 3)
    return out


def pair_scores(summary: list[dict]) -> dict:
    out = {}
    for r in summary:
        if r["category"] == "two_concepts":
            out[r["method"]] = {k: (round(r[k], 3), round(r[f"{k}_ci"], 3))
                                for k in ("both_present", "own_minus_other", "own_minus_other_2")}
    return out


def color_scores(summary: list[dict]) -> dict:
    """The Lab figures of one run: per method, median ΔE76, share within ΔE 20, shape; pairs per side."""
    out = {}
    for r in summary:
        if r["category"] in ("identity", "background", "references") and "delta_e" in r:
            out[f"{r['category']} {r['method']}"] = {k: round(r[k], 3) for k in ("delta_e", "within_20", "shape")}
        if r["category"] == "two_concepts":
            out[f"pairs {r['method']}"] = {k: round(r[k], 3) for k in (
                "both_present", "delta_e", "delta_e_2", "nearer_own", "nearer_own_2", "shape", "shape_2")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=("training", "lag", "colors"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps (studies use 25; reports use the paper's 50)")
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--pairs", action="store_true", help="training study: also the two-concept prompts (summed, LAG)")
    ap.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                    help="training settings every variant starts from instead of the model's defaults (e.g. rank_ratio=0.2)")
    args = ap.parse_args(argv)

    from persres.settings import train_config_for
    from persres.workspace import Workspace
    from persres.config import MultiLagConfig, SampleConfig
    from persres.models import load_pipeline, resolve_model
    from persres.registry import Registry
    from persres.toy import world
    from persres.toy.bench import ToyBenchConfig, prepare_concepts, run_toy_bench, summarize

    model = resolve_model(args.model)
    pipe = load_pipeline(model)
    names = list(world.CONCEPT_SETS["tuning"])
    start = dict(setting(kv) for kv in args.train)
    sample = SampleConfig(steps=args.steps)
    results = {}
    variants = {"training": TRAINING_VARIANTS, "lag": LAG_VARIANTS, "colors": COLOR_VARIANTS}[args.study]
    path = args.out / "study.json"
    for label, change in variants.items():
        if args.only and label not in args.only:
            continue
        if not args.only and path.exists() and label in json.loads(path.read_text())["results"]:
            continue  # finished by an earlier run (resume); --only reruns it
        t0 = time.time()
        if args.study == "training":
            registry = Registry(args.out / "registries" / label.replace(" ", "_").replace("(", "").replace(")", ""))
            config = train_config_for(model, start | change)
            cfg = ToyBenchConfig(samples=args.samples, seeds=tuple(range(args.seeds)), categories=("identity", "background"),
                                 pairs=args.pairs, pair_methods=("summed", "lag"), sample=sample)
        elif args.study == "lag":
            registry = Registry(args.out / "registries" / "defaults")  # packs named by config digest: one per start config
            config = train_config_for(model, start)
            cfg = ToyBenchConfig(samples=args.samples, seeds=tuple(range(args.seeds)), singles=False,
                                 pair_methods=("lag",) if results else ("base", "summed", "lag"),
                                 sample=sample.replace(multi=MultiLagConfig(**change)))
        else:  # colors: one registry, packs named by their config's digest; LAG variants reuse the defaults' packs
            registry = Registry(args.out / "registries" / "colors")
            config = train_config_for(model, start | change.get("train", {}))
            lag_only = "lag" in change
            cfg = ToyBenchConfig(samples=args.samples, seeds=tuple(range(args.seeds)), singles=not lag_only,
                                 categories=("identity", "background"), pair_methods=("lag",),
                                 sample=sample.replace(multi=MultiLagConfig(**change.get("lag", {}))))
        loaded = prepare_concepts(Workspace(model, registry=registry, pipe=pipe), names, config)
        rows = run_toy_bench(pipe, loaded, args.out / label.replace(" ", "_").replace(",", ""), cfg,
                             meta={"variant": label, "train": config.to_dict()})
        summary = summarize(rows)
        if args.study == "training":
            results[label] = {"identity": lifts(summary, "identity"), "background": lifts(summary, "background")}
            if args.pairs:
                results[label]["pairs"] = pair_scores(summary)
        elif args.study == "lag":
            results[label] = pair_scores(summary)
        else:
            results[label] = color_scores(summary)
        results[label]["seconds"] = round(time.time() - t0)
        from persres import residuals

        residuals.remove(pipe.unet)
        print(label, json.dumps(results[label]), flush=True)
        meta = {"study": args.study, "model": model, "samples": args.samples, "seeds": args.seeds, "ddim_steps": args.steps,
                "concepts": names, "defaults": dataclasses.asdict(train_config_for(model, start))}
        write_study(path, meta, {label: results[label]})


def write_study(path: Path, meta: dict, results: dict) -> None:
    """Adds `results` to study.json after each variant, so an interrupted run keeps what it finished;
    variants run in several invocations accumulate, the latest run of a variant wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        previous = json.loads(path.read_text())
        meta = previous["meta"] | {"note": previous["meta"].get("note", "")}
        results = previous["results"] | results
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
