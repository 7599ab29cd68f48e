"""The train-many manifest: many concepts in one file, read and checked row by row.

A manifest is a CSV file (a header row) or JSON Lines (one object per line), one concept per
row: `images`, `name`, `class` and optionally `steps`, `lr`, `rank_ratio`, `seed`, `model`.
Image folders are relative to the manifest. A row that cannot be trained (bad folder,
duplicate name, bad option...) is reported and the others go on.
The runner that trains them is `persres.train_many`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from persres.errors import InputError

REQUIRED = ("images", "name", "class")
OPTIONAL = ("steps", "lr", "rank_ratio", "seed", "model")
NUMBERS = {"steps": int, "lr": float, "rank_ratio": float, "seed": int}
MAX_ROWS = 100_000


@dataclass(frozen=True)
class Row:
    index: int  # 0-based, in manifest order
    line: int  # where it is in the file (1-based; the CSV header is line 1)
    images: str
    name: str
    class_word: str
    overrides: dict = field(default_factory=dict)  # steps, lr, rank_ratio, seed as given
    model: str | None = None
    problem: str | None = None  # why the row cannot run, found while reading it
    config: object = None  # a whole TrainConfig (the bench's), instead of the model's defaults + overrides


def read_manifest(path: str | Path) -> list[Row]:
    """The manifest's rows; a file that is not a manifest at all is one InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"manifest {str(path)!r} is a folder; give the .csv or .jsonl file in it (one concept per row)")
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} not found (a .csv or .jsonl file, one concept per row)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (what spreadsheets write as "CSV UTF-8") is not data
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read manifest {str(path)!r}: {type(e).__name__}") from None
    if path.suffix.lower() == ".csv":
        records = _csv_records(text, path)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        records = _jsonl_records(text, path)
    else:
        raise InputError(f"manifest {str(path)!r} must be .csv or .jsonl")
    if not records:
        raise InputError(f"manifest {str(path)!r} has no rows")
    if len(records) > MAX_ROWS:
        raise InputError(f"manifest {str(path)!r} has {len(records)} rows; at most {MAX_ROWS}")
    base = path.parent
    return [_row(i, line, data, base) for i, (line, data) in enumerate(records)]


def _csv_records(text: str, path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise InputError(f"manifest {str(path)!r}: " + "; ".join(
            ([f"missing column(s) {', '.join(missing)}"] if missing else []) + ([f"unknown column(s) {', '.join(unknown)}"] if unknown else []))
            + f" (columns: {', '.join(REQUIRED + OPTIONAL)})")
    records = []
    for rec in reader:
        if None in rec:  # csv puts values beyond the header's columns under the key None
            records.append((reader.line_num, {"__bad__": f"{len(rec[None])} more value(s) than the header's "
                                                         f"{len(header)} columns (a comma inside a value needs quotes)"}))
        else:
            records.append((reader.line_num, {k: v for k, v in rec.items() if v not in (None, "")}))
    return records


def _jsonl_records(text: str, path: Path) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            data = None
        out.append((n, data if isinstance(data, dict) else {"__bad__": "not a JSON object"}))
    return out


def _row(index: int, line: int, data: dict, base: Path) -> Row:
    def bad(problem: str) -> Row:
        return Row(index, line, str(data.get("images", "")), str(data.get("name", f"row {index + 1}")),
                   str(data.get("class", "")), problem=f"line {line}: {problem}")

    if "__bad__" in data:
        return bad(data["__bad__"])
    unknown = [k for k in data if k not in REQUIRED + OPTIONAL]
    if unknown:
        return bad(f"unknown field(s) {', '.join(map(str, unknown))}")
    for key in (*REQUIRED, "model"):
        if key in data and not isinstance(data[key], str):
            return bad(f"{key} must be text, got {json.dumps(data[key])}")
    missing = [k for k in REQUIRED if not isinstance(data.get(k), str) or not data[k].strip()]
    if missing:
        return bad(f"missing {', '.join(missing)}")
    overrides = {}
    for key, kind in NUMBERS.items():
        if key not in data:
            continue
        value = data[key]
        wanted = "an integer" if kind is int else "a number"
        try:
            value = kind(value) if isinstance(value, str) else value
        except ValueError:
            return bad(f"{key} must be {wanted}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)):
            return bad(f"{key} must be {wanted}, got {json.dumps(value)}")
        overrides[key] = value
    images = data["images"]
    folder = images if images.startswith("toy:") else str((base / images).resolve())
    model = data.get("model")
    return Row(index, line, folder, data["name"], data["class"], overrides, model if isinstance(model, str) and model else None)
