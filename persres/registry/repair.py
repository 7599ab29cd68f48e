"""Keeping rows and pack files in agreement: the sweep at every start and `persres doctor`.

A crash leaves at most a temporary file or a pack file without a row; the sweep moves such
leftovers to orphans/ (never deletes them). `doctor` reports every disagreement between rows
and files and, with `repair`, fixes what can be fixed.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_alive(pid: int, host: str) -> bool:
    """Whether a reservation's holder may still be running: a live pid here, or any pid on another host."""
    return host != socket.gethostname() or _pid_alive(pid)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _writer_alive(temp_name: str) -> bool:
    """`.STEM.PID.RANDOM.tmp` -> whether process PID still runs (old-style names: assume not)."""
    parts = temp_name.split(".")
    return len(parts) >= 5 and parts[-3].isdigit() and _pid_alive(int(parts[-3]))




class Repairs:
    """The sweep and doctor of `Registry` (a mixin: it uses the registry's db, folders and transaction)."""

    def sweep(self) -> list[str]:
        """Release reservations whose process is gone, and move leftovers of crashed writers to
        orphans/: temporary files whose writer is gone, and pack files no row points at. Returns
        one note per file moved (a released reservation held nothing worth a note)."""
        with self.transaction():
            self._drop_stale_reservations()
        if not self.packs_dir.is_dir():
            return []
        notes = []
        with self.transaction():  # writers link pack files only while holding this lock
            paths = {Path(r[0]).name for r in self.conn.execute("SELECT path FROM concepts").fetchall()}
            for f in sorted(self.packs_dir.iterdir()):
                if f.name.endswith(".tmp") and f.name.startswith("."):
                    if _writer_alive(f.name):
                        continue
                    notes.append(self._move_to_orphans(f, "an unfinished pack write (its process is gone)"))
                elif f.suffix == ".safetensors" and f.name not in paths:
                    notes.append(self._move_to_orphans(f, "a pack file without a registry row"))
        return notes

    def doctor(self, repair: bool = False) -> list[str]:
        """Problems between rows and files, one line each; with `repair`, fix what can be fixed."""
        from persres.packs import sha256_file

        problems = []
        good, bad = self.scan()
        for d in bad:
            problems.append(f"row {d.name!r} is damaged: {d.problem}" + ("; removed (its pack, if any, moved to orphans/)" if repair else ""))
            if repair:
                with self.transaction():
                    row = self.conn.execute("SELECT path FROM concepts WHERE name = ?", [d.name]).fetchone()
                    self.conn.execute("DELETE FROM concepts WHERE name = ?", [d.name])
                    pack = self._pack_path(str(row[0])) if row else None
                    if pack is not None and pack.is_file():
                        self._move_to_orphans(pack, f"the pack of the damaged row {d.name!r}")
        for r in good:
            if not r.path.is_file():
                problems.append(f"{r.name!r}: its pack {str(r.path)!r} is missing" + ("; row removed" if repair else ""))
                if repair:
                    with self.transaction():
                        self.conn.execute("DELETE FROM concepts WHERE name = ?", [r.name])
            elif sha256_file(r.path) != r.sha256:
                problems.append(f"{r.name!r}: its pack {str(r.path)!r} changed since it was registered"
                                + ("; row removed, pack moved to orphans/" if repair else ""))
                if repair:
                    with self.transaction():
                        self.conn.execute("DELETE FROM concepts WHERE name = ?", [r.name])
                        self._move_to_orphans(r.path, f"a pack that changed after registration ({r.name!r})")
        for name, pid, rhost in self.conn.execute("SELECT name, pid, host FROM reservations").fetchall():
            if not _holder_alive(pid, rhost):
                problems.append(f"reservation of {name!r} by a finished process {pid}" + ("; released" if repair else ""))
        if repair:
            with self.transaction():
                self._drop_stale_reservations()
        return problems

    def _move_to_orphans(self, path: Path, why: str) -> str:
        self.orphans_dir.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.orphans_dir / f"{stamp}-{path.name.lstrip('.')}"
        k = 1
        while target.exists():
            target = self.orphans_dir / f"{stamp}-{k}-{path.name.lstrip('.')}"
            k += 1
        os.replace(path, target)
        note = f"moved {path.name} to {target} ({why})"
        with open(self.orphans_dir / "NOTES.txt", "a") as f:
            f.write(f"{_now()} {note}\n")
        return note
