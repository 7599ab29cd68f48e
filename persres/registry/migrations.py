"""Numbered registry schema migrations, each applied once, in order, in one transaction.

Never edit a released migration: add the next one.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = []


def migration(fn: Callable[[sqlite_utils.Database], None]):
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_concepts(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE concepts (
            name TEXT PRIMARY KEY,
            identifier TEXT NOT NULL,
            class_word TEXT NOT NULL,
            ranks TEXT NOT NULL,            -- JSON: block -> rank
            channels TEXT NOT NULL,         -- JSON: block -> channels
            parameter_count INTEGER NOT NULL,
            base_model TEXT NOT NULL,
            architecture TEXT NOT NULL,     -- sha256 of blocks, channels, proj_out kind
            weights TEXT NOT NULL,          -- sha256 of the base model's proj_out weights
            train_config TEXT NOT NULL,     -- JSON
            image_hashes TEXT NOT NULL,     -- JSON list of sha256
            created_at TEXT NOT NULL,
            loss_start REAL,
            loss_end REAL,
            seconds REAL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX concepts_identifier ON concepts(identifier)")


@migration
def m002_settings(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migration
def m003_unique_identifiers_and_reservations(db: sqlite_utils.Database) -> None:
    """Identifiers unique among trained concepts; identifiers reserved while a training runs;
    the pack's proj_out kind kept in its row.

    A registry from v0.1 may already hold concepts that share an identifier (a race, or an
    import): the later ones are marked `shared_identifier` and stay usable alone.
    """
    db.execute("ALTER TABLE concepts ADD COLUMN shared_identifier INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE concepts ADD COLUMN proj_out TEXT NOT NULL DEFAULT 'Conv2d'")  # Linear for SD 2.x / XL packs
    db.execute(
        """
        UPDATE concepts SET shared_identifier = 1 WHERE rowid NOT IN
            (SELECT MIN(rowid) FROM concepts GROUP BY identifier)
        """
    )
    db.execute("DROP INDEX IF EXISTS concepts_identifier")
    db.execute("CREATE UNIQUE INDEX concepts_identifier ON concepts(identifier) WHERE shared_identifier = 0")
    db.execute(
        """
        CREATE TABLE reservations (
            name TEXT PRIMARY KEY,
            identifier TEXT NOT NULL UNIQUE,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            created_at TEXT NOT NULL
        )
        """
    )


@migration
def m004_family(db: sqlite_utils.Database) -> None:
    """The model family of each pack (sd1, sd2, sdxl). Rows from before: SD 1.x when their proj_out
    is Conv2d (only SD 1.x has one), else left '' and inferred from the blocks when read."""
    db.execute("ALTER TABLE concepts ADD COLUMN family TEXT NOT NULL DEFAULT ''")
    db.execute("UPDATE concepts SET family = 'sd1' WHERE proj_out = 'Conv2d'")


@migration
def m005_in_channels(db: sqlite_utils.Database) -> None:
    """Each block's proj_out input features where they differ from its output channels (FLUX.1's
    single-stream blocks: attention + MLP -> dim), as JSON; '{}' for every UNet pack."""
    db.execute("ALTER TABLE concepts ADD COLUMN in_channels TEXT NOT NULL DEFAULT '{}'")


@migration
def m006_layers(db: sqlite_utils.Database) -> None:
    """A pack's layers other than proj_out (a community LoRA's, as JSON: layer -> [rank, out, in(, kh, kw)])
    and whether it acts everywhere under LAG (a style); '{}' and 0 for every earlier pack."""
    db.execute("ALTER TABLE concepts ADD COLUMN layers TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE concepts ADD COLUMN everywhere INTEGER NOT NULL DEFAULT 0")


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone() is not None


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """The names of the migrations the database records, in the order they were applied."""
    if not has_table(conn, "_migrations"):
        return []
    return [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid").fetchall()]


def unknown_migrations(applied: list[str]) -> list[str]:
    """Those of `applied` this persres does not know (a newer persres wrote the database)."""
    known = {name for name, _ in MIGRATIONS}
    return [name for name in applied if name not in known]


def pending_migrations(applied: list[str]) -> list[str]:
    """The migrations of this persres the database does not record yet."""
    return [name for name, _ in MIGRATIONS if name not in applied]


def sqlite_utils_database(conn: sqlite3.Connection) -> "sqlite_utils.Database":
    """`conn` wrapped by sqlite-utils, imported only here (migrations, tests): reading commands
    start without it. sqlite-utils imports pandas and numpy where they are installed, only to
    convert values the registry never inserts (0.7 s); imported with both hidden (unless already
    loaded), they stay importable for everyone else."""
    hidden = [name for name in ("pandas", "numpy") if name not in sys.modules and "sqlite_utils" not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError: sqlite-utils' own fallback
    try:
        import sqlite_utils
    finally:
        for name in hidden:
            del sys.modules[name]
    return sqlite_utils.Database(conn)


def migrate(db: sqlite_utils.Database, transaction) -> list[str]:
    """Apply every migration not yet applied, each in `transaction()` (BEGIN IMMEDIATE); returns their names."""
    with transaction():
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT DEFAULT CURRENT_TIMESTAMP)")
    applied = []
    for name, fn in MIGRATIONS:
        with transaction():  # checked inside the lock: two processes never apply one migration twice
            if list(db.execute("SELECT 1 FROM _migrations WHERE name = ?", [name]).fetchall()):
                continue
            fn(db)
            db.execute("INSERT INTO _migrations (name) VALUES (?)", [name])
        applied.append(name)
    return applied
