"""The concept registry: SQLite rows (sqlite-utils, numbered migrations) over pack files."""

import sys


def _import_sqlite_utils() -> None:
    """sqlite-utils imports pandas and numpy where they are installed, only to convert DataFrame
    and numpy values the registry never inserts; that is 0.7 s of every `persres list`. Imported
    here first with both hidden (unless already loaded), they stay importable for everyone else."""
    hidden = [name for name in ("pandas", "numpy") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError: sqlite-utils' own fallback
    try:
        import sqlite_utils  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


_import_sqlite_utils()

from persres.registry.store import ConceptRecord, Registry, persres_home  # noqa: E402

__all__ = ["ConceptRecord", "Registry", "persres_home"]
