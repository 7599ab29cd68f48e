"""`persres doctor --rebuild`: a new registry.db from the packs themselves.

Packs describe themselves (`persres.packs`), so a lost or garbage database loses nothing
that matters: every pack in packs/ (and in orphans/) is registered again under its own name and
identifier. A pack already in place (packs/NAME.safetensors) is read by its header alone and
left byte for byte as it is (so its sha256 is unchanged; its content hash is checked whenever
it is loaded); any other is read whole, verified against its content hash and written into
packs/. The old database is kept aside, never
deleted; what could not be restored is reported with the reason.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from persres.errors import PersresError


@dataclass
class Rebuilt:
    restored: list[str] = field(default_factory=list)  # one line per concept registered again
    refused: list[str] = field(default_factory=list)  # one line per pack file left out, with why
    kept_aside: list[Path] = field(default_factory=list)  # the old database files


def rebuild(home: Path) -> Rebuilt:
    from persres.packs import read_meta, read_pack, sha256_file
    from persres.registry.store import Registry

    home = Path(home).expanduser().absolute()
    report = Rebuilt()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        old = home / f"registry.db{suffix}"
        if old.exists() or old.is_symlink():
            aside = home / f"registry.db.broken-{stamp}{suffix}"
            os.replace(old, aside)
            report.kept_aside.append(aside)
    registry = Registry(home, sweep=False)  # a new, empty database; nothing swept before the packs are back
    registry.require_writable()
    candidates = sorted(registry.packs_dir.glob("*.safetensors")) if registry.packs_dir.is_dir() else []
    candidates += sorted(registry.orphans_dir.glob("*.safetensors")) if registry.orphans_dir.is_dir() else []
    for path in candidates:
        try:
            meta = read_meta(path)  # the header alone
        except PersresError as e:
            report.refused.append(f"{path}: {e}")
            continue
        if registry.has(meta.name):
            report.refused.append(f"{path}: a concept named {meta.name!r} is already restored from another file")
            continue
        try:
            if path.parent == registry.packs_dir and path.name == f"{meta.name}.safetensors":
                with registry.transaction():  # the file stays where it is, byte for byte
                    shared = registry.identifier_taken(meta.identifier)
                    registry._insert(meta, path, sha256_file(path), shared)
                record = registry.get(meta.name)
            else:  # an orphan, or a pack under another name: verified whole, written into packs/ under its own
                tensors, meta = read_pack(path)
                record = registry.add(tensors, meta, allow_shared_identifier=True)
        except PersresError as e:
            report.refused.append(f"{path}: {e}")
            continue
        report.restored.append(f"{record.name} ({record.meta.class_word}, identifier {record.meta.identifier!r}"
                               f"{', shared' if record.shared_identifier else ''}) from {path}")
    return report
