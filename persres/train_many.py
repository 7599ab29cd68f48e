"""`persres train-many`: train every row of a manifest (`persres.manifest`), on one process or many.

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

Each row trains through `Workspace.train`, as `persres train` does, with the identifier
planned for it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from persres.errors import InputError, PersresError
from persres.manifest import Row


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


def train_many(rows: list[Row], *, model: str | None = None, model_config: str | None = None, registry=None,
               shards: Path | None = None, cluster=None, log=lambda message: None, workspace=None) -> list[RowResult]:
    """Train every row (this process's share of them), register, and return every row's result
    (all processes', in manifest order). `workspace`: one of `model` already open (its pipeline is reused)."""
    from persres.scale import Cluster

    cluster = cluster or Cluster()
    spaces = Spaces(registry, model_config, cluster.device, workspace)
    plan = cluster.share(_plan(rows, model, registry, spaces) if cluster.main else None)  # {index: Planned}
    mine = cluster.split([r.index for r in rows])
    results = [_run(rows[i], plan[i], spaces, shards, cluster, log) for i in mine]
    cluster.wait()
    results = cluster.gather(results)  # every process's, on every process
    if shards is not None:  # only rank 0 touches the registry
        if cluster.main:
            _register_shards(results, registry, shards)
        results = cluster.share(results if cluster.main else None)
    return sorted(results, key=lambda r: r.index)


class Spaces:
    """One workspace per base model the rows name, at most one of them with a loaded pipeline."""

    def __init__(self, registry, model_config, device, workspace=None):
        self.registry, self.model_config, self.device = registry, model_config, device
        self.by_model = {} if workspace is None else {workspace.model: workspace}
        self.given = workspace

    def get(self, model: str | None):
        from persres.workspace import Workspace

        if self.given is not None and model in (None, self.given.model):
            return self.given
        if model not in self.by_model:
            ws = Workspace(model, registry=self.registry, model_config=self.model_config, device=self.device,
                           open_registry=self.registry is not None)
            if ws.model in self.by_model:
                return self.by_model[ws.model]
            self.by_model[ws.model] = ws
            return ws
        return self.by_model[model]

    def loading(self, ws) -> None:
        """Before `ws` loads its pipeline: the others let theirs go (one model in memory at a time)."""
        for other in self.by_model.values():
            if other is not ws and other is not self.given:
                other.release()


def _plan(rows: list[Row], model: str | None, registry, spaces: Spaces) -> dict[int, Planned]:
    from persres.settings import config_digest

    weights: dict[str, str] = {}  # model -> its weights' fingerprint, read once, only to check a registered row
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
            ws = spaces.get(row.model or model)
            resolved = ws.model
            config = row.config or ws.train_config(row.overrides)
            if registry.has(row.name):
                record = registry.get(row.name)
                if record.meta.train_config.get("config_digest") != config_digest(config, resolved):
                    raise InputError(f"a concept named {row.name!r} is already registered with another training config or model")
                if resolved not in weights:
                    weights[resolved] = ws.base_weights()
                if record.meta.weights != weights[resolved]:
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
        except PersresError as e:  # each problem says which line of the manifest it is on
            message = str(e) if str(e).startswith(f"line {row.line}:") else f"line {row.line}: {e}"
            plan[row.index] = Planned("failed", message, resolved)
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


def _run(row: Row, planned: Planned, spaces: Spaces, shards, cluster, log) -> RowResult:
    status, value = planned.status, planned.value
    if status == "failed":
        return RowResult(row.name, "failed", message=value, rank=cluster.rank, index=row.index)
    if status == "skipped":
        return RowResult(row.name, "skipped", identifier=value, message="already registered with this config",
                         rank=cluster.rank, index=row.index)
    t0 = time.perf_counter()
    log(f"{row.name}: training on rank {cluster.rank}")
    try:
        ws = spaces.get(planned.model)
        spaces.loading(ws)
        outcome = ws.train(row.images, row.name, row.class_word, config=planned.config, identifier=value, register=shards is None)
        if shards is not None:  # another machine's process: the pack goes to its shard, rank 0 registers it
            from persres.packs import write_pack

            shards.mkdir(parents=True, exist_ok=True)
            write_pack(shards / f"{row.name}.safetensors", outcome.tensors, outcome.meta)
    except PersresError as e:
        return RowResult(row.name, "failed", time.perf_counter() - t0, message=str(e), rank=cluster.rank, index=row.index)
    except OSError as e:
        return RowResult(row.name, "failed", time.perf_counter() - t0, message=f"{type(e).__name__}: {e}", rank=cluster.rank,
                         index=row.index)
    log(f"{row.name}: trained on rank {cluster.rank}")
    return RowResult(row.name, "trained", time.perf_counter() - t0, outcome.losses[-1], value, rank=cluster.rank, index=row.index)


def _register_shards(results: list[RowResult], registry, shards: Path) -> None:
    """Rank 0, after the barrier: register every pack the processes wrote into the shard folder."""
    for r in results:
        if r.status != "trained":
            continue
        try:
            registry.import_pack(shards / f"{r.name}.safetensors")
        except PersresError as e:
            r.status, r.message = "failed", f"trained, but not registered: {e}"
