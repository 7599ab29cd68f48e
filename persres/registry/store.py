"""The concept registry: a SQLite table of packs plus the pack files beside it.

Layout under PERSRES_HOME (default: the platform's user data directory):
    registry.db          concepts, reservations, settings, _migrations (WAL mode)
    packs/NAME.safetensors
    orphans/             files the registry found without a row, moved aside (never deleted)

Every write is one `BEGIN IMMEDIATE` transaction, so concurrent processes queue (busy
timeout) instead of racing. A training reserves its name and identifier before it starts
(the identifier must be known to train) and turns the reservation into a row when it ends.
A pack is written under a unique temporary name and moved into place only inside the
transaction that inserts its row, never over an existing file: a crash leaves at most a
temporary file or a file without a row, which the next start moves to orphans/.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import sqlite3
from dataclasses import replace
from pathlib import Path

from persres import families
from persres.atomic import atomic_path
from persres.errors import ConceptNotFound, DuplicateConcept, RegistryError
from persres.packs import PackMeta, read_pack, validate_meta, write_pack_temp
from persres.registry.rows import META_FIELDS, ROW_FIELDS, ConceptRecord, DamagedRecord, meta_of, row_of  # noqa: F401
from persres.registry.migrations import (MIGRATIONS, applied_migrations, has_table, migrate, pending_migrations, sqlite_utils_database,
                                         unknown_migrations)
from persres.registry.lock import held, read_marker
from persres.registry.sqlite import BUSY_TIMEOUT_S, _busy, _identity, _switch_to_wal, read_only_uri
from persres.registry.paths import _fault, _move_no_replace, check_export_target, persres_home  # noqa: F401  (re-exported)
from persres.registry.repair import Repairs, _holder_alive, _now
from persres.names import check_concept_name
from persres.tokens import identifier_candidates

REBUILDING = ("the registry is being rebuilt by `persres doctor --rebuild` in another process (waited {:.0f}s); "
              "try again when it has finished")


class Registry(Repairs):
    def __init__(self, home: Path | None = None, sweep: bool = True, rebuild: bool = False):
        # absolute: rows record their pack's path, which must not depend on the working directory
        self.home = (Path(home) if home is not None else persres_home()).expanduser().absolute()
        self.packs_dir = self.home / "packs"
        self.orphans_dir = self.home / "orphans"
        self.references_dir = self.home / "references"  # NAME.png: a contact sheet of a trained concept's references
        self.db_path = self.home / "registry.db"
        self.notes: list[str] = []  # what opening the registry repaired (orphans moved aside)
        self.rebuild = rebuild  # opened by `doctor --rebuild` itself, under its exclusive lock
        self._open()
        if sweep and self.writable:
            self.notes += self.sweep()

    # --- opening -------------------------------------------------------------------------
    def _open(self) -> None:
        home = self.home
        if home.exists() and not home.is_dir():
            raise RegistryError(f"registry home {str(home)!r} is a file, not a folder: point PERSRES_HOME at a folder")
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create the registry home {str(home)!r}: {e.strerror or e}") from None
        if self.db_path.exists() and not self.db_path.is_file():
            raise RegistryError(f"registry {str(self.db_path)!r} is not a file: `persres doctor --rebuild` makes a new one from its packs")
        self.writable = os.access(home, os.W_OK) and (not self.db_path.exists() or os.access(self.db_path, os.W_OK))
        with self._repair_lock():
            self._refuse_an_interrupted_rebuild()
            self._connect()

    def _refuse_an_interrupted_rebuild(self) -> None:
        """Nothing is opened, swept or written while a killed rebuild's marker says the database is incomplete."""
        if not self.rebuild and read_marker(self.home) is not None:
            raise RegistryError(f"an interrupted `persres doctor --rebuild` left the registry {str(self.db_path)!r} incomplete; "
                                "nothing was changed: run `persres doctor --rebuild` to finish it")

    def _repair_lock(self):
        """The repair lock, shared (`persres.registry.lock`): not while a rebuild runs elsewhere."""
        if not self.writable or self.rebuild:
            return contextlib.nullcontext()
        return held(self.home, exclusive=False, timeout=BUSY_TIMEOUT_S, what=REBUILDING.format(BUSY_TIMEOUT_S))

    def _connect(self) -> None:
        home = self.home
        hint = "`persres doctor --rebuild` makes a new one from its packs (the old file is kept aside)"
        try:
            if not self.writable and not self.db_path.exists():
                raise RegistryError(f"registry home {str(home)!r} is not writable by this user and holds no registry yet: "
                                    "point PERSRES_HOME at a folder you can write")
            uri = self.db_path.resolve().as_uri() if self.writable else read_only_uri(self.db_path)
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if self.writable:
                _switch_to_wal(conn)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            self.conn = conn
            self._identity = _identity(self.db_path)
            applied = applied_migrations(conn)
            newer = unknown_migrations(applied)
            if newer:
                raise RegistryError(
                    f"registry {str(self.db_path)!r} has schema {len(MIGRATIONS) + len(newer)} (migration {newer[0]!r}), "
                    f"newer than this persres (schema {len(MIGRATIONS)}): upgrade persres"
                )
            if self.writable and pending_migrations(applied):
                migrate(self.db, self.transaction)
            elif not self.writable and not has_table(conn, "concepts"):
                raise RegistryError(f"registry {str(self.db_path)!r} is read-only and not initialized")
            self._check_columns()
        except sqlite3.OperationalError as e:
            if _busy(e):
                raise RegistryError(f"registry {str(self.db_path)!r} stayed locked by another process for "
                                    f"{BUSY_TIMEOUT_S:.0f}s; try again when it has finished") from None
            if "readonly" in str(e) or "read-only" in str(e):
                raise RegistryError(f"registry {str(self.db_path)!r} is not writable by this user ({e}); "
                                    "reading commands still work where the folder can be read") from None
            raise RegistryError(f"registry {str(self.db_path)!r} cannot be used ({e}): {hint}") from None
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"registry {str(self.db_path)!r} is damaged ({e}): {hint}") from None

    @functools.cached_property
    def db(self):
        """The connection as a `sqlite_utils.Database`, for migrations (reads and writes use `conn`)."""
        return sqlite_utils_database(self.conn)

    def _check_columns(self) -> None:
        expected = {*META_FIELDS, *ROW_FIELDS}
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(concepts)").fetchall()}
        if not expected <= have:
            raise RegistryError(f"registry {str(self.db_path)!r} lacks columns {sorted(expected - have)}: "
                                "it was changed by hand or by another program; `persres doctor --rebuild` makes a new one from its packs")

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, so writers queue, never interleave."""
        if self.conn.in_transaction:  # nested: part of the outer transaction
            yield
            return
        with self._repair_lock():
            self._refuse_an_interrupted_rebuild()  # one may have been killed since this process opened the registry
            if _identity(self.db_path) != self._identity:  # rebuilt since this process opened it: the new one
                self.conn.close()
                self.__dict__.pop("db", None)
                self._connect()
            conn = self.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if _busy(e):
                    raise RegistryError(f"registry {str(self.db_path)!r} stayed locked by another process for "
                                        f"{BUSY_TIMEOUT_S:.0f}s; try again when it has finished") from None
                raise
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def require_writable(self) -> None:
        """Call before work whose result must be registered (a training, an import): probes a real write."""
        import tempfile

        if not self.writable:
            raise RegistryError(f"registry home {str(self.home)!r} is not writable by this user: nothing can be trained, imported "
                                "or removed there (point PERSRES_HOME at a folder you can write)")
        try:
            self.packs_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.packs_dir):
                pass
        except OSError as e:
            raise RegistryError(f"cannot write to the packs folder {str(self.packs_dir)!r}: {e.strerror or e}") from None

    # --- reading ---------------------------------------------------------------------------
    def scan(self) -> tuple[list[ConceptRecord], list[DamagedRecord]]:
        """Every row: readable concepts, and rows that are damaged (reported, never a crash)."""
        good, bad = [], []
        for row in self._rows("SELECT * FROM concepts ORDER BY created_at, name"):
            try:
                good.append(self._record(row))
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                bad.append(DamagedRecord(str(row.get("name")), " ".join(str(e).split())[:160]))
        return good, bad

    def _rows(self, sql: str, params: list | tuple = ()) -> list[dict]:
        """A query's rows as {column: value}."""
        cursor = self.conn.execute(sql, params)
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, values)) for values in cursor.fetchall()]

    def list(self) -> list[ConceptRecord]:
        return self.scan()[0]

    def names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM concepts ORDER BY name").fetchall()]

    def get(self, name: str) -> ConceptRecord:
        rows = self._rows("SELECT * FROM concepts WHERE name = ?", [name])
        if not rows:
            raise ConceptNotFound(f"unknown concept {name!r} (known: {', '.join(self.names()) or 'none registered'})")
        try:
            return self._record(rows[0])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RegistryError(f"the registry row of {name!r} is damaged ({' '.join(str(e).split())[:160]}); "
                                f"`persres doctor --repair` removes it") from None

    def identifier_taken(self, identifier: str) -> bool:
        """Whether a concept (not marked shared) already has `identifier`."""
        return self.conn.execute("SELECT 1 FROM concepts WHERE identifier = ? AND shared_identifier = 0", [identifier]).fetchone() is not None

    def has(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM concepts WHERE name = ?", [name]).fetchone() is not None

    def load(self, name: str):
        """(tensors, meta) of a registered concept, verified against its recorded sha256."""
        record = self.get(name)
        return read_pack(record.path, record.sha256)

    def check_new_name(self, name: str) -> None:
        check_concept_name(name)
        if self.has(name):
            raise DuplicateConcept(f"a concept named {name!r} already exists (persres rm {name}, or choose another --name)")
        if self._live_reservation(name):
            raise DuplicateConcept(f"a concept named {name!r} is being trained by another process right now")

    # --- reservations ------------------------------------------------------------------------
    @contextlib.contextmanager
    def reservation(self, name: str, fits=None):
        """Reserve `name` and a fresh identifier for a training; yields the identifier.

        `fits(identifier) -> bool` says whether the model's tokenizer takes it as one token.
        `add` consumes the reservation; leaving the block without `add` releases it.
        """
        self.require_writable()
        with self.transaction():
            self._drop_stale_reservations()
            self.check_new_name(name)
            identifier = self._free_identifier(fits)
            self.conn.execute("INSERT INTO reservations (name, identifier, pid, host, created_at) VALUES (?, ?, ?, ?, ?)",
                            [name, identifier, os.getpid(), socket.gethostname(), _now()])
        _fault("reserved")
        try:
            yield identifier
        finally:
            with self.transaction():
                self.conn.execute("DELETE FROM reservations WHERE name = ? AND pid = ?", [name, os.getpid()])

    def free_identifier(self, tokenizer=None, exclude: set[str] = frozenset()) -> str:
        """The first identifier no concept or reservation holds, outside `exclude`, that `tokenizer`
        (if given) keeps as one token: what a plan of several trainings hands out in advance."""
        from persres.tokens import is_single_token

        with self.transaction():
            self._drop_stale_reservations()
            return self._free_identifier(None if tokenizer is None else lambda ident: is_single_token(tokenizer, ident), exclude)

    def _free_identifier(self, fits, exclude: set[str] = frozenset()) -> str:
        used = {r[0] for r in self.conn.execute("SELECT identifier FROM concepts UNION SELECT identifier FROM reservations")}
        used |= set(exclude)
        for n, candidate in enumerate(identifier_candidates()):
            if candidate in used:
                continue
            if fits is None or fits(candidate):
                return candidate
            if n > 20_000:
                break
        raise RegistryError(f"no free identifier: the model's tokenizer has no unused single-token identifier left "
                            f"({len(used)} in use); remove concepts you no longer need")

    def _live_reservation(self, name: str) -> bool:
        row = self.conn.execute("SELECT pid, host FROM reservations WHERE name = ?", [name]).fetchone()
        return row is not None and _holder_alive(row[0], row[1])

    def _drop_stale_reservations(self) -> None:
        for name, pid, rhost in self.conn.execute("SELECT name, pid, host FROM reservations").fetchall():
            if not _holder_alive(pid, rhost):
                self.conn.execute("DELETE FROM reservations WHERE name = ?", [name])

    # --- writing ---------------------------------------------------------------------------
    def add(self, tensors, meta: PackMeta, *, allow_shared_identifier: bool = False) -> ConceptRecord:
        """Register a pack: written to a temporary file, moved into place and inserted in one transaction.

        A trained concept's identifier must be its own reservation's; an imported one may
        share an identifier with another concept (`allow_shared_identifier`), and is marked so.
        """
        self.require_writable()
        validate_meta(meta)
        check_concept_name(meta.name)
        tmp, digest = write_pack_temp(self.packs_dir, tensors, meta, stem=meta.name)
        _fault("temp-written")
        path = self.packs_dir / f"{meta.name}.safetensors"
        try:
            with self.transaction():
                if self.has(meta.name):
                    raise DuplicateConcept(f"a concept named {meta.name!r} already exists")
                holder = self.conn.execute("SELECT pid, host FROM reservations WHERE name = ?", [meta.name]).fetchone()
                if holder is not None and tuple(holder) != (os.getpid(), socket.gethostname()) and self._live_reservation(meta.name):
                    raise DuplicateConcept(f"a concept named {meta.name!r} is being trained by another process right now")
                owner = self.conn.execute("SELECT name FROM concepts WHERE identifier = ? AND shared_identifier = 0",
                                        [meta.identifier]).fetchone()
                reserved = self.conn.execute("SELECT name FROM reservations WHERE identifier = ?", [meta.identifier]).fetchone()
                shared = owner is not None or (reserved is not None and reserved[0] != meta.name)
                if shared and not allow_shared_identifier:
                    raise DuplicateConcept(f"identifier {meta.identifier!r} already belongs to "
                                           f"{(owner or reserved)[0]!r}")
                if path.exists():  # a file without a row (the name is free): keep it, aside
                    self._move_to_orphans(path, "a pack file without a registry row was in the way of a new concept")
                _move_no_replace(tmp, path)
                _fault("linked")
                try:
                    self._insert(meta, path, digest, shared)
                    self.conn.execute("DELETE FROM reservations WHERE name = ?", [meta.name])
                    _fault("inserted")
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
        finally:
            tmp.unlink(missing_ok=True)
        return ConceptRecord(meta, path, digest, shared)

    def import_pack(self, source: Path, name: str | None = None) -> ConceptRecord:
        tensors, meta = read_pack(Path(source))
        if name is not None:
            check_concept_name(name)
            meta = PackMeta(**{**meta.__dict__, "name": name})
        self.check_new_name(meta.name)
        return self.add(tensors, meta, allow_shared_identifier=True)

    def remove(self, name: str) -> Path:
        """Delete the row (committed first), then its pack file; returns the pack's path. Works on damaged
        rows too. Killed between the two, the file is left without a row: the next start moves it to orphans/."""
        self.require_writable()
        with self.transaction():
            row = self.conn.execute("SELECT path FROM concepts WHERE name = ?", [name]).fetchone()
            if row is None:
                raise ConceptNotFound(f"unknown concept {name!r} (known: {', '.join(self.names()) or 'none registered'})")
            self.conn.execute("DELETE FROM concepts WHERE name = ?", [name])
        _fault("removed-row")
        path = self._pack_path(str(row[0]))
        if path.suffix == ".safetensors" and path.is_file():  # never anything but a pack file of packs/
            path.unlink()
        self.reference_sheet(name).unlink(missing_ok=True)
        return path

    def reference_sheet(self, name: str) -> Path:
        """Where the contact sheet of `name`'s reference images is kept (it may not exist: imports have none)."""
        return self.references_dir / f"{name}.png"
    def export_pack(self, name: str, out: Path, force: bool = False) -> Path:
        record = self.get(name)
        check_export_target(out, self, force)
        read_pack(record.path, record.sha256)  # verify before copying
        with atomic_path(out) as tmp:
            shutil.copyfile(record.path, tmp)
        return out

    def setting(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str | None) -> None:
        if not self.writable:
            return  # a read-only registry cannot remember settings; nothing else depends on them
        with self.transaction():
            if value is None:
                self.conn.execute("DELETE FROM settings WHERE key = ?", [key])
            else:
                self.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", [key, value])

    # --- internals -------------------------------------------------------------------------
    def _insert(self, meta: PackMeta, path: Path, digest: str, shared: bool) -> None:
        row = {**row_of(meta), "path": str(path), "sha256": digest, "shared_identifier": int(shared)}
        cols = ", ".join(row)
        try:
            self.conn.execute(f"INSERT INTO concepts ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        except sqlite3.IntegrityError as e:
            raise DuplicateConcept(f"cannot register {meta.name!r}: {e}") from None

    def _record(self, row: dict) -> ConceptRecord:
        meta = validate_meta(meta_of(row))
        meta = replace(meta, family=families.of_meta(meta).key)  # rows from before the family was recorded
        if not isinstance(row["path"], str) or not isinstance(row["sha256"], str):
            raise ValueError("path or sha256 is not text")
        return ConceptRecord(meta, self._pack_path(row["path"]), row["sha256"], bool(row.get("shared_identifier", 0)))

    def _pack_path(self, stored: str) -> Path:
        """Where a row's pack is now: packs live only in packs/, so the recorded path's file name
        under this home (a moved or restored home, or a row written under a relative home, still
        finds its pack)."""
        return self.packs_dir / Path(stored).name
