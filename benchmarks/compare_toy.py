"""Two `persres bench toy` runs side by side, paired image by image.

    python -m benchmarks.compare_toy RUN_A RUN_B [--json OUT]

Rows of the two results.csv are paired by (concept, prompt, method, seed, image): the same
prompt and the same initial noise, so a per-image difference removes the prompt-to-prompt
spread. For each (set, category, method) and score: A's and B's mean ± 95% interval, and
the paired difference B − A ± its 95% interval. "within" says whether each mean lies in the
other's interval (the precision parity test); "paired" whether the paired difference's
interval contains 0 (stricter: the prompt-to-prompt spread is gone).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from persres.toy.bench import mean_ci

SCORES = ("identity", "background", "added", "attribute", "both_present", "own_minus_other", "own_minus_other_2")
KEY = ("concept", "prompt", "method", "seed", "image")


def read(run: Path) -> dict[tuple, dict]:
    with open(run / "results.csv", newline="") as f:
        return {tuple(r[k] for k in KEY): r for r in csv.DictReader(f)}


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> list[dict]:
    shared = [k for k in a if k in b]
    groups: dict[tuple, list[tuple]] = {}
    for k in shared:
        groups.setdefault((a[k]["set"], a[k]["category"], a[k]["method"]), []).append(k)
    out = []
    for (s, category, method), keys in groups.items():
        for score in SCORES:
            pairs = [(float(a[k][score]), float(b[k][score])) for k in keys if a[k].get(score) not in (None, "") and b[k].get(score) not in (None, "")]
            if not pairs:
                continue
            (ma, ca), (mb, cb) = mean_ci([x for x, _ in pairs]), mean_ci([y for _, y in pairs])
            md, cd = mean_ci([y - x for x, y in pairs])
            out.append({"set": s, "category": category, "method": method, "score": score, "n": len(pairs),
                        "a": round(ma, 4), "a_ci": round(ca, 4), "b": round(mb, 4), "b_ci": round(cb, 4),
                        "b_minus_a": round(md, 4), "diff_ci": round(cd, 4),
                        "within": abs(mb - ma) <= min(ca, cb) or abs(mb - ma) < 5e-4, "paired": abs(md) <= cd or abs(md) < 5e-4})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = compare(read(args.a), read(args.b))
    print(f"{'set':9} {'category':11} {'method':7} {'score':10} {'n':>4}  {'A':>13}  {'B':>13}  {'B - A':>14}  within paired")
    for r in rows:
        print(f"{r['set']:9} {r['category']:11} {r['method']:7} {r['score']:10} {r['n']:4}  {r['a']:6.3f} ± {r['a_ci']:.3f}"
              f"  {r['b']:6.3f} ± {r['b_ci']:.3f}  {r['b_minus_a']:+6.3f} ± {r['diff_ci']:.3f}  {'yes' if r['within'] else 'NO':6} {'yes' if r['paired'] else 'NO'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
