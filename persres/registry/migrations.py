"""Numbered registry schema migrations, each applied once, in order, in one transaction.

Never edit a released migration: add the next one.
"""

from __future__ import annotations

from collections.abc import Callable

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


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply every migration not yet applied; returns their names."""
    with db.atomic():
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT DEFAULT CURRENT_TIMESTAMP)")
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with db.atomic():
            fn(db)
            db.execute("INSERT INTO _migrations (name) VALUES (?)", [name])
        applied.append(name)
    return applied
