"""The concept registry: a SQLite table of packs (sqlite-utils) plus the pack files beside it.

Layout under PERSRES_HOME (default: the platform's user data directory):
    registry.db          concepts, settings, _migrations
    packs/NAME.safetensors

A pack file is complete on disk before its row is inserted; a failed insert removes the
file it wrote. Removing a concept deletes the row first, then the file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlite_utils

from persres.errors import ConceptNotFound, DuplicateConcept
from persres.packs import PackMeta, read_pack, write_pack
from persres.registry.migrations import migrate
from persres.residuals import check_concept_name
from persres.tokens import BoundConcept, identifier_candidates


def persres_home() -> Path:
    env = os.environ.get("PERSRES_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("persres", appauthor=False))


@dataclass(frozen=True)
class ConceptRecord:
    meta: PackMeta
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.meta.name

    def bound(self) -> BoundConcept:
        return BoundConcept(self.meta.name, self.meta.identifier, self.meta.class_word)

    def to_dict(self) -> dict:
        return {**asdict(self.meta), "path": str(self.path), "sha256": self.sha256}


class Registry:
    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home is not None else persres_home()
        self.packs_dir = self.home / "packs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(self.home / "registry.db")
        migrate(self.db)

    # --- reading ---------------------------------------------------------------------------
    def list(self) -> list[ConceptRecord]:
        return [self._record(row) for row in self.db["concepts"].rows_where(order_by="created_at, name")]

    def get(self, name: str) -> ConceptRecord:
        rows = list(self.db["concepts"].rows_where("name = ?", [name]))
        if not rows:
            known = ", ".join(r["name"] for r in self.db["concepts"].rows_where(select="name")) or "none registered"
            raise ConceptNotFound(f"unknown concept {name!r} (known: {known})")
        return self._record(rows[0])

    def has(self, name: str) -> bool:
        return bool(list(self.db["concepts"].rows_where("name = ?", [name], select="name")))

    def load(self, name: str):
        """(tensors, meta) of a registered concept, verified against its recorded sha256."""
        record = self.get(name)
        return read_pack(record.path, record.sha256)

    def next_identifier(self) -> str:
        used = {row["identifier"] for row in self.db["concepts"].rows_where(select="identifier")}
        return next(i for i in identifier_candidates() if i not in used)

    def check_new_name(self, name: str) -> None:
        check_concept_name(name)
        if self.has(name):
            raise DuplicateConcept(f"a concept named {name!r} already exists (persres rm {name}, or choose another --name)")

    # --- writing ---------------------------------------------------------------------------
    def add(self, tensors, meta: PackMeta) -> ConceptRecord:
        """Write the pack file atomically, then register it in one transaction."""
        self.check_new_name(meta.name)
        path = self.packs_dir / f"{meta.name}.safetensors"
        digest = write_pack(path, tensors, meta)
        try:
            self._insert(meta, path, digest)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return ConceptRecord(meta, path, digest)

    def import_pack(self, source: Path, name: str | None = None) -> ConceptRecord:
        tensors, meta = read_pack(Path(source))
        if name is not None:
            meta = PackMeta(**{**meta.__dict__, "name": name})
        return self.add(tensors, meta)

    def remove(self, name: str) -> ConceptRecord:
        record = self.get(name)
        with self.db.atomic():
            self.db.execute("DELETE FROM concepts WHERE name = ?", [name])
        record.path.unlink(missing_ok=True)
        return record

    def export_pack(self, name: str, out: Path) -> Path:
        record = self.get(name)
        read_pack(record.path, record.sha256)  # verify before copying
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(record.path, tmp)
        os.replace(tmp, out)
        return out

    def setting(self, key: str) -> str | None:
        rows = list(self.db["settings"].rows_where("key = ?", [key]))
        return rows[0]["value"] if rows else None

    def set_setting(self, key: str, value: str | None) -> None:
        with self.db.atomic():
            if value is None:
                self.db.execute("DELETE FROM settings WHERE key = ?", [key])
            else:
                self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", [key, value])

    # --- internals -------------------------------------------------------------------------
    def _insert(self, meta: PackMeta, path: Path, digest: str) -> None:
        row = {
            "name": meta.name,
            "identifier": meta.identifier,
            "class_word": meta.class_word,
            "ranks": json.dumps(meta.ranks),
            "channels": json.dumps(meta.channels),
            "parameter_count": meta.parameter_count,
            "base_model": meta.base_model,
            "architecture": meta.architecture,
            "weights": meta.weights,
            "train_config": json.dumps(meta.train_config),
            "image_hashes": json.dumps(meta.image_hashes),
            "created_at": meta.created_at,
            "loss_start": meta.loss_start,
            "loss_end": meta.loss_end,
            "seconds": meta.seconds,
            "path": str(path),
            "sha256": digest,
        }
        with self.db.atomic():
            if self.has(meta.name):
                raise DuplicateConcept(f"a concept named {meta.name!r} already exists")
            cols = ", ".join(row)
            self.db.execute(f"INSERT INTO concepts ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def _record(self, row: dict) -> ConceptRecord:
        meta = PackMeta(
            name=row["name"], identifier=row["identifier"], class_word=row["class_word"],
            ranks=json.loads(row["ranks"]), channels=json.loads(row["channels"]),
            parameter_count=row["parameter_count"], base_model=row["base_model"],
            architecture=row["architecture"], weights=row["weights"],
            train_config=json.loads(row["train_config"]), image_hashes=json.loads(row["image_hashes"]),
            created_at=row["created_at"], loss_start=row["loss_start"], loss_end=row["loss_end"], seconds=row["seconds"],
        )
        return ConceptRecord(meta, Path(row["path"]), row["sha256"])
