"""A training choice decided on both tuning sets, with several training seeds per concept.

    OMP_NUM_THREADS=1 python -m benchmarks.toy_seeds run --variant rank_ratio=0.05 --out benchmarks/results/toy-seeds
    OMP_NUM_THREADS=1 python -m benchmarks.toy_seeds run --variant rank_ratio=0.2 --out benchmarks/results/toy-seeds
    OMP_NUM_THREADS=1 python -m benchmarks.toy_seeds pairs --out benchmarks/results/toy-seeds
    python -m benchmarks.toy_seeds report --out benchmarks/results/toy-seeds

`run` trains every concept of the tuning sets ("tuning", "tuning_2"; `--sets held_out` only
to report a choice already made) once per training seed with the toy model's defaults plus the variant, and scores the
change-background prompts (base / no LAG / LAG, one sampling seed) into
OUT/<variant>/rows.json; variants can run side by side. `report` prints, per variant, the
identity lift over the base model (paired per image) and, for each pair of variants, the
paired difference of their lifts over the same concepts, seeds, prompts and images: its
mean and interval over images, and over packs (a concept and training seed: the unit
that varies, so the interval to read). `pairs` takes every variant's packs as `run` left
them (no training) and draws each set's concept pairs with summed residuals and with LAG
into OUT/<variant>/pairs.json; `report` then adds, per variant and between variants, both
objects present and own − other, with intervals over (pair, training seed). `pairs --lag
KEY=VALUE...` draws the same pairs with LAG only, under other several-concept region
choices (`MultiLagConfig`), into OUT/<variant>/pairs-lag-<choices>.json; `report` pairs each
with the run's default LAG, pair by pair and seed by seed.

`run --strength S` samples the packs of a run at strength S (`gen -c NAME:S`) into
OUT/<run>,strength=S, training only the packs that run does not have yet; `report` pairs it
with the run image by image.

`--model M --label NAME` runs a variant on another model into OUT/NAME (rows.json records the
model; `pairs` draws each run's pairs on the model its packs were trained on), so `report`
pairs it with the same variant on the shipped model, concept by concept and seed by seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import time
from dataclasses import asdict
from pathlib import Path

TUNING_SETS = ("tuning", "tuning_2")
PAIR_METRICS = ("both_present", "own_minus_other", "own_minus_other_2")


def label(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(variant.items())) or "defaults"


def strength_suffix(strength: float) -> str:
    """What a run sampled at another strength adds to the name of the run whose packs it uses."""
    return "" if strength == 1 else f",strength={strength:g}"


def run(args) -> None:
    from benchmarks.toy_study import setting
    from persres import residuals
    from persres.settings import train_config_for
    from persres.workspace import Workspace
    from persres.config import SampleConfig
    from persres.models import load_pipeline, resolve_model
    from persres.registry import Registry
    from persres.toy import world
    from persres.toy.bench import ToyBenchConfig, prepare_concepts, run_toy_bench

    variant = dict(setting(kv) for kv in args.variant)
    packs = args.out / (args.label or label(variant))  # where the packs live: a strength reuses them
    folder = packs.with_name(packs.name + strength_suffix(args.strength))
    model = resolve_model(args.model)
    pipe = load_pipeline(model)
    names = [n for s in args.sets for n in world.CONCEPT_SETS[s]]
    # a registry per variant: a concept gets the same identifier in every variant (the toy model
    # has 24), so variants are paired on it; training seeds still draw different ones
    registry = Registry(packs / "registry")
    cfg = ToyBenchConfig(samples=args.samples, seeds=(0,), categories=("background",), pairs=False,
                         sample=SampleConfig(steps=args.steps), strength=args.strength)
    saved = folder / "rows.json"
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else []  # resumable: finished packs are kept
    done = {(r["concept"], r["train_seed"]) for r in rows}
    for train_seed in range(args.train_seeds):
        config = train_config_for(model, variant | {"seed": train_seed})
        for name in names:  # one concept at a time: its pack, its samples
            if (name, train_seed) in done:
                continue
            t0 = time.time()
            loaded = prepare_concepts(Workspace(model, registry=registry, pipe=pipe), [name], config)
            got = run_toy_bench(pipe, loaded, folder / f"seed{train_seed}" / name, cfg, meta={"train": config.to_dict()})
            rows += [r | {"train_seed": train_seed} for r in got]
            residuals.remove(pipe.unet)
            print(f"{folder.name} seed {train_seed} {name}: {time.time() - t0:.0f}s", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"variant": variant, "model": model, "config": config.to_dict(), "strength": args.strength, "rows": rows}))


def pairs(args) -> None:
    from persres import residuals
    from benchmarks.toy_study import setting
    from persres.config import MultiLagConfig, SampleConfig, TrainConfig
    from persres.models import load_pipeline, resolve_model
    from persres.registry import Registry
    from persres.toy import world
    from persres.toy.bench import ToyBenchConfig, prepare_concepts, run_toy_bench
    from persres.workspace import Workspace

    lag = dict(setting(kv) for kv in args.lag)
    # other region choices: LAG only (summing does not look at regions), into a file of their own
    cfg = ToyBenchConfig(samples=args.samples, seeds=(0,), singles=False, pair_methods=("lag",) if lag else ("summed", "lag"),
                         sample=SampleConfig(steps=args.steps, multi=MultiLagConfig(**lag)))
    filename = f"pairs-lag-{label(lag)}.json" if lag else "pairs.json"

    chosen = args.label or (label(dict(setting(kv) for kv in args.variant)) if args.variant else "*")  # one run, or all
    pipes: dict[str, object] = {}
    for saved in sorted(args.out.glob(f"{chosen}/rows.json")):
        folder = saved.parent
        run_ = json.loads(saved.read_text())
        model = run_.get("model") or resolve_model(args.model)  # the model its packs were trained on
        if model not in pipes:
            pipes[model] = load_pipeline(model)
        pipe = pipes[model]
        out = folder / filename
        rows = json.loads(out.read_text())["rows"] if out.exists() else []
        done = {r["train_seed"] for r in rows}
        for train_seed in sorted({r["train_seed"] for r in run_["rows"]} - done):
            config = TrainConfig(**(run_["config"] | {"seed": train_seed}))  # the packs' own config: found, not retrained
            names = [n for s in world.CONCEPT_SETS for n in world.CONCEPT_SETS[s]
                     if any(r["concept"] == n and r["train_seed"] == train_seed for r in run_["rows"])]
            strength = run_.get("strength", 1.0)
            packs = folder.with_name(folder.name.removesuffix(strength_suffix(strength)))
            registry = Registry(packs / "registry")
            before = len(registry.list())
            loaded = prepare_concepts(Workspace(model, registry=registry, pipe=pipe), names, config)
            if len(registry.list()) != before:
                raise SystemExit(f"{folder.name}: a pack of seed {train_seed} was missing and got trained; the run changed")
            got = run_toy_bench(pipe, loaded, folder / f"seed{train_seed}" / out.stem, dataclasses.replace(cfg, strength=strength))
            residuals.remove(pipe.unet)
            rows += [r | {"train_seed": train_seed} for r in got]
            out.write_text(json.dumps({"variant": run_["variant"], "multi": asdict(cfg.sample.multi), "rows": rows}))
            print(f"{folder.name} {out.stem} seed {train_seed}: {len(got)} pair images", flush=True)


def pair_units(rows: list[dict], method: str, metric: str) -> dict[tuple, float]:
    """(pair, train seed) -> mean of `metric` over that pair's images with `method`."""
    return by({(r["concept"], r["train_seed"], r["image"]): r[metric] for r in rows if r["method"] == method}, 2)


def lifts(rows: list[dict], method: str) -> dict[tuple, float]:
    """(concept, train seed, prompt, image) -> identity of `method` minus the base model's."""
    key = lambda r: (r["concept"], r["train_seed"], r["prompt"], r["image"])  # noqa: E731
    base = {key(r): r["identity"] for r in rows if r["method"] == "base"}
    return {key(r): r["identity"] - base[key(r)] for r in rows if r["method"] == method}


def by(values: dict[tuple, float], width: int) -> dict[tuple, float]:
    """Mean of the values sharing the first `width` key fields: 1 per concept, 2 per pack (concept, train seed)."""
    groups: dict[tuple, list[float]] = {}
    for k, v in values.items():
        groups.setdefault(k[:width], []).append(v)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def report(args) -> None:
    from persres.toy import world
    from persres.toy.bench import mean_ci

    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(args.out.glob("*/rows.json"))}
    pair_runs = {p.parent.name: json.loads(p.read_text())["rows"] for p in sorted(args.out.glob("*/pairs.json"))}
    sets = sorted({r["set"] for run_ in runs.values() for r in run_["rows"]})
    out = {"sets": sets, "variants": {}}
    for name, run_ in runs.items():
        rows = run_["rows"]
        entry = {"n_concepts": len({r["concept"] for r in rows}), "train_seeds": sorted({r["train_seed"] for r in rows})}
        for method in ("nolag", "lag"):
            d = lifts(rows, method)
            entry[method] = mean_ci(list(d.values()))
            entry[f"{method} over packs"] = mean_ci(list(by(d, 2).values()))
            for s in sets:
                values = [v for k, v in d.items() if k[0] in world.CONCEPT_SETS[s]]
                if values:
                    entry[f"{method} {s}"] = mean_ci(values)
            entry[f"{method} per concept"] = {c: round(v, 3) for (c,), v in by(d, 1).items()}
        entry["background"] = {m: mean_ci([r["background"] for r in rows if r["method"] == m]) for m in ("base", "nolag", "lag")}
        if any("drawn" in r for r in rows):  # rows that score whether the object is there at all
            entry["drawn"] = {m: mean_ci([r["drawn"] for r in rows if r["method"] == m]) for m in ("base", "nolag", "lag")}
        pair_rows = pair_runs.get(name, [])
        for method in ("summed", "lag") if pair_rows else ():
            entry[f"pairs {method}"] = {metric: mean_ci(list(pair_units(pair_rows, method, metric).values()))
                                        for metric in PAIR_METRICS}
        default = {metric: pair_units(pair_rows, "lag", metric) for metric in PAIR_METRICS}
        for path in sorted(args.out.glob(f"{glob.escape(name)}/pairs-lag-*.json")):  # other region choices, same packs
            other = json.loads(path.read_text())["rows"]
            choice = {}
            for metric in PAIR_METRICS:
                mine = pair_units(other, "lag", metric)
                common = sorted(set(mine) & set(default[metric]))
                choice[metric] = mean_ci(list(mine.values()))
                if common:  # a run whose default pairs.json is missing has nothing to pair with
                    choice[f"{metric} - default"] = mean_ci([mine[k] - default[metric][k] for k in common]) + (len(common),)
            entry[path.stem] = choice
        out["variants"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if "per concept" not in k}))
    names = list(runs)
    out["paired"] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for method in ("nolag", "lag"):
                da, db = lifts(runs[a]["rows"], method), lifts(runs[b]["rows"], method)
                common = sorted(set(da) & set(db))
                if not common:
                    continue
                diffs = {k: db[k] - da[k] for k in common}
                packs = by(diffs, 2)
                out["paired"][f"{b} - {a}, {method}"] = {
                    "per image": mean_ci(list(diffs.values())) + (len(diffs),),
                    # images of one pack are not independent: the interval over packs is the honest one
                    "per pack": mean_ci(list(packs.values())) + (len(packs),),
                }
                print(f"{b} - {a}, {method}:", json.dumps(out["paired"][f"{b} - {a}, {method}"]))
            if a in pair_runs and b in pair_runs:
                for metric in PAIR_METRICS:
                    ua, ub = pair_units(pair_runs[a], "lag", metric), pair_units(pair_runs[b], "lag", metric)
                    common = sorted(set(ua) & set(ub))
                    out["paired"][f"{b} - {a}, pairs lag {metric}"] = mean_ci([ub[k] - ua[k] for k in common]) + (len(common),)
                    print(f"{b} - {a}, pairs lag {metric}:", json.dumps(out["paired"][f"{b} - {a}, pairs lag {metric}"]))
    (args.out / "report.json").write_text(json.dumps(out, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "pairs", "report"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", nargs="*", default=[], metavar="KEY=VALUE", help="training settings over the model's defaults")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--label", help="the run's folder under --out [default: the variant's settings]; "
                                    "e.g. to run the same variant on another --model beside it")
    ap.add_argument("--sets", nargs="*", default=TUNING_SETS, help="concept sets to train and score (held_out: to report, never to choose)")
    ap.add_argument("--train-seeds", type=int, default=2)
    ap.add_argument("--strength", type=float, default=1.0, help="run: sample every pack at this strength, into OUT/<run>,strength=S "
                    "(the packs of OUT/<run>, trained there if missing)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--lag", nargs="*", default=[], metavar="KEY=VALUE",
                    help="pairs: several-concept region choices over MultiLagConfig's defaults (LAG only, into pairs-lag-CHOICES.json)")
    args = ap.parse_args(argv)
    {"run": run, "pairs": pairs, "report": report}[args.what](args)


if __name__ == "__main__":
    main()
