"""What a registry row holds: a concept's PackMeta (one column per field) and where its pack is."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from persres import families
from persres.packs import PackMeta
from persres.tokens import BoundConcept

META_FIELDS = tuple(f.name for f in fields(PackMeta))  # a row holds every PackMeta field, in a column of its name
JSON_FIELDS = {f.name for f in fields(PackMeta) if f.type in ("dict", "list[str]", "dict[str, int]", "dict[str, list[int]]")}  # stored as JSON text
BOOL_FIELDS = {f.name for f in fields(PackMeta) if f.type == "bool"}  # stored as 0 / 1
ROW_FIELDS = ("path", "sha256", "shared_identifier")  # and what the registry knows of the file


def row_of(meta: PackMeta) -> dict:
    """A concepts row's PackMeta columns (JSON for the structured fields, the family always named)."""
    values = {f: getattr(meta, f) for f in META_FIELDS}
    return {**{f: json.dumps(v) if f in JSON_FIELDS else v for f, v in values.items()}, "family": families.of_meta(meta).key}


def meta_of(row: dict) -> PackMeta:
    """The PackMeta a concepts row holds (not yet validated)."""
    return PackMeta(**{f: json.loads(row[f]) if f in JSON_FIELDS else bool(row[f]) if f in BOOL_FIELDS else row[f]
                       for f in META_FIELDS})


@dataclass(frozen=True)
class ConceptRecord:
    meta: PackMeta
    path: Path
    sha256: str
    shared_identifier: bool = False  # imported with an identifier another concept already had

    @property
    def name(self) -> str:
        return self.meta.name

    def bound(self) -> BoundConcept:
        return BoundConcept(self.meta.name, self.meta.identifier, self.meta.class_word, everywhere=self.meta.everywhere)

    def to_dict(self) -> dict:
        return {**asdict(self.meta), "path": str(self.path), "sha256": self.sha256, "shared_identifier": self.shared_identifier}


@dataclass(frozen=True)
class DamagedRecord:
    """A registry row that cannot be read as a concept; `list` shows it, `doctor` can remove it."""

    name: str
    problem: str
