"""The registry's SQLite connection: its busy handling, WAL mode, read-only opening, identity."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

BUSY_TIMEOUT_S = 60.0


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file the database is now (a rebuild puts a new one in its place)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _busy(e: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the lock."""
    return "locked" in str(e) or "busy" in str(e)


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """PRAGMA journal_mode = WAL, retried while another connection is switching the same new file:
    SQLite answers that clash with SQLITE_BUSY at once, without calling the busy handler (two
    processes opening a fresh registry together failed about 1 time in 8)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def read_only_uri(db_path: Path) -> str:
        """How a registry this user cannot write is read. SQLite opens a WAL database read-only only
        where it can create the `-shm` index: so straight from the file as immutable when no
        write-ahead log is pending, else from a private copy of the database and its log."""
        wal = Path(f"{db_path}-wal")
        if not wal.exists() or wal.stat().st_size == 0:
            return f"{db_path.resolve().as_uri()}?immutable=1"
        import atexit
        import tempfile

        copy = Path(tempfile.mkdtemp(prefix="persres-readonly-"))
        atexit.register(shutil.rmtree, copy, True)
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{db_path}{suffix}", copy / f"registry.db{suffix}")
        return f"{(copy / 'registry.db').as_uri()}?mode=rw"
