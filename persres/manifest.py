"""`persres train-many`: many concepts from one manifest, on one process or many.

A manifest is a CSV file (a header row) or JSON Lines (one object per line), one concept per
row: `images`, `name`, `class` and optionally `steps`, `lr`, `rank_ratio`, `seed`, `model`.
Image folders are relative to the manifest. A row that cannot be trained (bad folder,
duplicate name, bad option...) is reported and the others go on.

How a run goes, on any number of processes (`persres.scale`):
1. every process reads the manifest; rank 0 reads the registry and plans: a row already
   registered with the same training config, on the weights now at the model's path, is done
   ("skipped"); one registered with another config, or on other weights at that path, fails;
   the rest get fresh identifiers, in manifest order. The plan is broadcast, so identifiers
   (and so results) do not depend on how many processes run.
2. the rows are split between processes; each trains its own.
3. one machine (shared registry): each process registers its packs (SQLite WAL; `add`
   checks names and identifiers inside its write transaction). Several machines, or
   `--shards`: processes write pack files into OUT/shards/ only, and after a barrier rank 0
   registers them, so the SQLite file is only ever touched by one machine.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from persres.errors import InputError, PersresError

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


@dataclass
class RowResult:
    name: str
    status: str  # trained, skipped, failed
    seconds: float = 0.0
    loss: float | None = None
    identifier: str = ""
    message: str = ""
    rank: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Planned(NamedTuple):
    """Rank 0's decision for one row, broadcast to every process."""

    status: str  # planned, skipped, failed
    value: str  # the identifier (planned, skipped) or why it failed
    model: str = ""
    config: object = None  # the TrainConfig the row trains with (planned)


def read_manifest(path: str | Path) -> list[Row]:
    """The manifest's rows; a file that is not a manifest at all is one InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} not found (a .csv or .jsonl file, one concept per row)")
    try:
        text = path.read_text(encoding="utf-8")
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
    return [(reader.line_num, {k: v for k, v in rec.items() if v not in (None, "")}) for rec in reader]


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
    missing = [k for k in REQUIRED if not isinstance(data.get(k), str) or not data[k].strip()]
    if missing:
        return bad(f"missing {', '.join(missing)}")
    overrides = {}
    for key, kind in NUMBERS.items():
        if key not in data:
            continue
        value = data[key]
        try:
            overrides[key] = kind(value) if isinstance(value, str) else value
        except ValueError:
            return bad(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    images = data["images"]
    folder = images if images.startswith("toy:") else str((base / images).resolve())
    model = data.get("model")
    return Row(index, line, folder, data["name"], data["class"], overrides, model if isinstance(model, str) and model else None)


def train_many(rows: list[Row], *, model: str | None = None, model_config: str | None = None, registry=None,
               shards: Path | None = None, cluster=None, log=lambda message: None, pipe=None) -> list[RowResult]:
    """Train every row (this process's share of them), register, and return every row's result
    (all processes', in manifest order). `pipe`: an already loaded pipeline of `model`."""
    from persres.scale import Cluster

    cluster = cluster or Cluster()
    pipes = {} if pipe is None else {model: pipe}  # one loaded model at a time, reused across rows
    plan = cluster.share(_plan(rows, model, registry, model_config, pipe) if cluster.main else None)  # {index: Planned}
    mine = cluster.split([r.index for r in rows])
    results = [_run(rows[i], plan[i], model_config, registry, shards, cluster, log, pipes) for i in mine]
    cluster.wait()
    results = cluster.gather(results)  # every process's, on every process
    if shards is not None:  # only rank 0 touches the registry
        if cluster.main:
            _register_shards(results, registry, shards)
        results = cluster.share(results if cluster.main else None)
    return sorted(results, key=lambda r: r.index)


def _plan(rows: list[Row], model: str | None, registry, model_config=None, pipe=None) -> dict[int, Planned]:
    from persres.api import config_digest, model_config_for, model_for, train_config_for
    from persres.models import base_weights

    weights: dict[str, str] = {}  # model -> its weights' fingerprint, read once, only to check a registered row

    def weights_of(resolved: str) -> str:
        if resolved not in weights:
            config_dir = model_config_for(registry, resolved, model_config)
            weights[resolved] = base_weights(resolved, config_dir, pipe if resolved == model else None)  # as _train_row's pipes
        return weights[resolved]

    plan: dict[int, Planned] = {}
    taken: set[str] = set()
    names: set[str] = set()
    tokenizers: dict[str, object] = {}
    for row in rows:
        resolved = ""
        try:
            if row.problem:
                raise InputError(row.problem)
            if row.name in names:
                raise InputError(f"line {row.line}: the name {row.name!r} is on an earlier row too")
            names.add(row.name)
            resolved, _ = model_for(registry, row.model or model)
            config = row.config or train_config_for(resolved, row.overrides)
            if registry.has(row.name):
                record = registry.get(row.name)
                if record.meta.train_config.get("config_digest") != config_digest(config, resolved):
                    raise InputError(f"a concept named {row.name!r} is already registered with another training config or model")
                if record.meta.weights != weights_of(resolved):
                    raise InputError(f"a concept named {row.name!r} is already registered, trained on other weights than "
                                     f"those now at {resolved!r}; remove it or give the row another name")
                plan[row.index] = Planned("skipped", record.meta.identifier, resolved)
                continue
            registry.check_new_name(row.name)
            if resolved not in tokenizers:
                tokenizers[resolved] = _tokenizer(resolved)
            identifier = registry.free_identifier(tokenizers[resolved], exclude=taken)
            taken.add(identifier)
            plan[row.index] = Planned("planned", identifier, resolved, config)
        except PersresError as e:
            plan[row.index] = Planned("failed", str(e), resolved)
    return plan


def _tokenizer(model: str):
    """The model's tokenizer alone (no weights loaded) to test identifiers against."""
    from persres.models import is_single_file

    if is_single_file(model):  # the configs' tokenizer is the file's; loading it needs the pipeline anyway
        return None
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=Path(model).is_dir())
    except Exception:  # the pipeline load reports a missing model in one line later
        return None


def _run(row: Row, planned: Planned, model_config, registry, shards, cluster, log, pipes) -> RowResult:
    status, value = planned.status, planned.value
    if status == "failed":
        return RowResult(row.name, "failed", message=value, rank=cluster.rank, index=row.index)
    if status == "skipped":
        return RowResult(row.name, "skipped", identifier=value, message="already registered with this config",
                         rank=cluster.rank, index=row.index)
    t0 = time.perf_counter()
    log(f"{row.name}: training on rank {cluster.rank}")
    try:
        loss = _train_row(row, planned, model_config, registry, shards, cluster, pipes)
    except PersresError as e:
        return RowResult(row.name, "failed", time.perf_counter() - t0, message=str(e), rank=cluster.rank, index=row.index)
    except OSError as e:
        return RowResult(row.name, "failed", time.perf_counter() - t0, message=f"{type(e).__name__}: {e}", rank=cluster.rank,
                         index=row.index)
    log(f"{row.name}: trained on rank {cluster.rank}")
    return RowResult(row.name, "trained", time.perf_counter() - t0, loss, value, rank=cluster.rank, index=row.index)


def _train_row(row: Row, planned: Planned, model_config, registry, shards, cluster, pipes) -> float:
    from persres.api import model_config_for, trained_meta
    from persres.images import read_folder, resolve_folder
    from persres.models import load_pipeline, pick_dtype
    from persres.packs import write_pack
    from persres.tokens import check_class_word, is_single_token
    from persres.train import train_residuals

    identifier, model, config = planned.value, planned.model, planned.config
    class_word = check_class_word(row.class_word)
    references = read_folder(resolve_folder(row.images))
    if model not in pipes:
        config_dir = model_config_for(registry, model, model_config) if registry is not None else model_config
        pipes.clear()
        pipes[model] = load_pipeline(model, cluster.device, pick_dtype(config.precision, cluster.device), config_dir)
    pipe = pipes[model]
    if not is_single_token(pipe.tokenizer, identifier):
        raise InputError(f"the planned identifier {identifier!r} is not one token of {model!r}'s tokenizer")
    result = train_residuals(pipe, [r.image for r in references], identifier, class_word, config)
    meta = trained_meta(pipe, row.name, identifier, class_word, model, config, references, result)
    if shards is None:
        registry.add(result.tensors, meta)
    else:
        shards.mkdir(parents=True, exist_ok=True)
        write_pack(shards / f"{row.name}.safetensors", result.tensors, meta)
    return result.losses[-1]


def _register_shards(results: list[RowResult], registry, shards: Path) -> None:
    """Rank 0, after the barrier: register every pack the processes wrote into the shard folder."""
    for r in results:
        if r.status != "trained":
            continue
        try:
            registry.import_pack(shards / f"{r.name}.safetensors")
        except PersresError as e:
            r.status, r.message = "failed", f"trained, but not registered: {e}"
