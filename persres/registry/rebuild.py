"""`persres doctor --rebuild`: a new registry.db from the packs themselves.

Packs describe themselves (`persres.packs`), so a lost or garbage database loses nothing
that matters: every pack in packs/ (and in orphans/) is registered again under its own name and
identifier. A pack already in place (packs/NAME.safetensors) is read by its header alone and
left byte for byte as it is (so its sha256 is unchanged; its content hash is checked whenever
it is loaded); any other is read whole, verified against its content hash and written into
packs/. From an old database that can still be read, the settings (the configured model) and
the reservations of trainings still running are carried over.

What it promises (docs/reliability.md):
- it holds the repair lock exclusive (`persres.registry.lock`): it waits for writers to finish
  their transaction, and no other persres process opens, sweeps or writes the registry until it
  is done (they wait, or say that a rebuild runs);
- the old database is kept aside under a name no other file has (`.before-rebuild-` when it was
  readable, `.broken-` when not), never deleted or overwritten;
- killed at any point, it leaves `rebuild.json` behind: every later start refuses in one line
  and touches no pack, and the next `persres doctor --rebuild` finishes the job, taking the
  settings from the database kept aside first.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from persres.errors import PersresError

DB = "registry.db"
SIDE_FILES = ("", "-wal", "-shm")


@dataclass
class Rebuilt:
    restored: list[str] = field(default_factory=list)  # one line per concept registered again
    refused: list[str] = field(default_factory=list)  # one line per pack file left out, with why
    kept_aside: list[Path] = field(default_factory=list)  # the old database files
    carried: list[str] = field(default_factory=list)  # settings and reservations taken over from the old database
    resumed: bool = False  # it finished a rebuild that had been interrupted


def rebuild(home: Path) -> Rebuilt:
    from persres.registry.lock import clear_marker, held, read_marker, write_marker
    from persres.registry.paths import _fault
    from persres.registry.sqlite import BUSY_TIMEOUT_S

    home = Path(home).expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    busy = (f"another persres process kept the registry in {str(home)!r} busy for {BUSY_TIMEOUT_S:.0f}s; "
            "run `persres doctor --rebuild` again when it has finished")
    with held(home, exclusive=True, timeout=BUSY_TIMEOUT_S, what=busy):
        report = Rebuilt()
        earlier = read_marker(home)
        report.resumed = earlier is not None
        old = home / DB
        source = Path(earlier["kept_aside"][0]) if earlier and earlier.get("kept_aside") else old
        settings, reservations = _carried(source)
        readable = settings is not None if not earlier else bool(earlier.get("readable"))
        aside = _aside_name(home, "partial" if earlier else "before-rebuild" if readable else "broken")
        kept = [str(p) for p in (earlier or {}).get("kept_aside", [])]
        moving = [(home / f"{DB}{s}", Path(f"{aside}{s}")) for s in SIDE_FILES if (home / f"{DB}{s}").exists()
                  or (home / f"{DB}{s}").is_symlink()]
        write_marker(home, {"kept_aside": kept + [str(dst) for _, dst in moving if not dst.name.endswith(("-wal", "-shm"))],
                            "readable": readable})
        for src, dst in moving:
            os.replace(src, dst)  # `_aside_name` chose a name nothing has
            report.kept_aside.append(dst)
        _fault("rebuild-moved")
        _restore(home, report, settings or {}, reservations or [])
        clear_marker(home)
    return report


def _aside_name(home: Path, why: str) -> Path:
    """registry.db.WHY-STAMP-PID[-k]: a name no file in `home` has (checked under the exclusive lock)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base, k = home / f"{DB}.{why}-{stamp}-{os.getpid()}", 1
    candidate = base
    while any(Path(f"{candidate}{s}").exists() for s in SIDE_FILES):
        k += 1
        candidate = Path(f"{base}-{k}")
    return candidate


def _carried(db: Path) -> tuple[dict | None, list | None]:
    """(settings, reservations) of a database that can still be read, else (None, None)."""
    if not db.is_file():
        return None, None
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            settings = dict(conn.execute("SELECT key, value FROM settings").fetchall()) if "settings" in tables else {}
            reservations = conn.execute("SELECT name, identifier, pid, host, created_at FROM reservations").fetchall() \
                if "reservations" in tables else []
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None, None
    return settings, reservations


def _restore(home: Path, report: Rebuilt, settings: dict, reservations: list) -> None:
    from persres.packs import read_meta, read_pack, sha256_file
    from persres.registry.paths import _fault
    from persres.registry.repair import _holder_alive
    from persres.registry.store import Registry

    registry = Registry(home, sweep=False, rebuild=True)  # a new, empty database; nothing swept before the packs are back
    registry.require_writable()
    with registry.transaction():
        for key, value in settings.items():
            registry.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", [key, value])
            report.carried.append(f"setting {key} = {value}")
        for name, identifier, pid, host, created in reservations:
            if _holder_alive(pid, host):
                registry.conn.execute("INSERT OR IGNORE INTO reservations (name, identifier, pid, host, created_at) VALUES (?, ?, ?, ?, ?)",
                                      [name, identifier, pid, host, created])
                report.carried.append(f"reservation of {name!r} (identifier {identifier!r}, pid {pid})")
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
        _fault("rebuild-restored")
