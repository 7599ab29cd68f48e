"""Files that are either whole or absent: write beside the target, then rename over it.

A reader (a resumed bench, an image viewer, another tool loading an export) never sees a
half-written file: the content goes to `.NAME.PID.tmp` in the target's folder and
`os.replace` moves it into place in one step, or the temporary file is removed.
Registry packs have their own stricter rule (`persres.packs.write_pack_temp`: fsynced,
never moved over another file, swept by PID at the next start).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; it becomes `path` when the block ends
    without an error and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
