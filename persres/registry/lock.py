"""The registry's repair lock, and the marker an unfinished rebuild leaves.

`registry.lock` in PERSRES_HOME is an advisory file lock (`flock`): every start (opening,
migrating and sweeping the database) and every write transaction holds it shared, for as
long as it takes; `persres doctor --rebuild` holds it exclusive for the whole rebuild. So a
rebuild waits for running writers to finish their transaction, and no process opens, sweeps
or writes the registry while a rebuild moves its database aside and restores the packs. The
operating system releases a lock when its process dies, kill -9 included.

`rebuild.json` is written before a rebuild moves the old database aside and removed when
the rebuild has finished: a start that finds it knows the database is incomplete and does
nothing to the packs (`persres doctor --rebuild` finishes the job, reading the settings from
the database the marker names).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from persres.errors import RegistryError

LOCK_FILE = "registry.lock"
MARKER_FILE = "rebuild.json"

try:
    import fcntl
except ImportError:  # Windows: no flock; SQLite's own locking still serializes writers
    fcntl = None


@contextlib.contextmanager
def held(home: Path, exclusive: bool, timeout: float, what: str):
    """Hold the repair lock of `home` (shared, or exclusive) inside the block; RegistryError after
    `timeout` seconds of waiting, naming `what` waited."""
    if fcntl is None:
        yield
        return
    fd = os.open(Path(home) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline, pause = time.monotonic() + timeout, 0.01
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryError(what) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.25)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_marker(home: Path) -> dict | None:
    """What an unfinished rebuild recorded ({"kept_aside": [db files], "readable": bool}), or None."""
    path = Path(home) / MARKER_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"kept_aside": [], "readable": False}
    return data if isinstance(data, dict) else {"kept_aside": [], "readable": False}


def write_marker(home: Path, data: dict) -> None:
    from persres.atomic import atomic_path

    with atomic_path(Path(home) / MARKER_FILE) as tmp:
        tmp.write_text(json.dumps(data))


def clear_marker(home: Path) -> None:
    (Path(home) / MARKER_FILE).unlink(missing_ok=True)
