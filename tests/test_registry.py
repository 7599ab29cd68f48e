import dataclasses
import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from persres.errors import ConceptNotFound, DuplicateConcept, PackError
from persres.packs import (CONFIG_KEY, CONTENT_KEY, FORMAT1_FIELDS, VERSION_KEY, PackMeta, UnverifiedPackWarning,
                           content_sha256, read_meta, read_pack, write_pack)
from persres.registry import Registry
from persres.registry.migrations import MIGRATIONS, migrate


def make_meta(name="a", identifier="sks"):
    return PackMeta(
        name=name, identifier=identifier, class_word="dog", ranks={"blk.0": 2, "blk.1": 3},
        channels={"blk.0": 8, "blk.1": 12}, parameter_count=2 * 8 * 2 + 2 * 12 * 3, base_model="tiny",
        architecture="arch", weights="w", train_config={"steps": 3}, image_hashes=["h1"], created_at="2026-01-01",
        loss_start=1.0, loss_end=0.5,
    )


def make_tensors(meta, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) for k, shape in meta.expected_shapes().items()}


def test_add_get_list_remove(persres_home):
    reg = Registry()
    meta = make_meta()
    record = reg.add(make_tensors(meta), meta)
    assert record.path.exists() and record.path.parent == persres_home / "packs"
    assert reg.get("a").meta == dataclasses.replace(meta, family="sd1")  # the registry records the family (Conv2d: SD 1.x)
    assert [r.name for r in reg.list()] == ["a"]
    tensors, loaded = reg.load("a")
    torch.testing.assert_close(tensors, make_tensors(meta))
    reg.remove("a")
    assert reg.list() == [] and not record.path.exists()
    with pytest.raises(ConceptNotFound, match="unknown concept 'a'"):
        reg.get("a")


def test_a_registry_moved_or_opened_by_a_relative_path_from_elsewhere_still_finds_its_packs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = Registry(Path("rel-home"))  # PERSRES_HOME=rel-home
    meta = make_meta()
    reg.add(make_tensors(meta), meta)
    reg.db.conn.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tensors, _ = Registry(tmp_path / "rel-home").load("a")  # the same registry, from another directory
    torch.testing.assert_close(tensors, make_tensors(meta))
    (tmp_path / "rel-home").rename(tmp_path / "moved")  # a copied or restored home
    moved = Registry(tmp_path / "moved")
    assert moved.get("a").path == tmp_path / "moved" / "packs" / "a.safetensors"
    torch.testing.assert_close(moved.load("a")[0], make_tensors(meta))
    assert moved.doctor() == []  # nothing reported missing or orphaned


def test_duplicate_name_is_refused_and_keeps_the_existing_pack():
    reg = Registry()
    meta = make_meta()
    first = reg.add(make_tensors(meta), meta)
    with pytest.raises(DuplicateConcept):
        reg.add(make_tensors(meta, seed=1), meta)
    tensors, _ = reg.load("a")
    torch.testing.assert_close(tensors, make_tensors(meta))
    assert first.path.exists()


def test_failed_insert_removes_the_pack_it_wrote(monkeypatch):
    reg = Registry()
    meta = make_meta()

    def boom(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(reg, "_insert", boom)
    with pytest.raises(sqlite3.OperationalError):
        reg.add(make_tensors(meta), meta)
    assert not list(reg.packs_dir.glob("*"))


def test_identifiers_are_handed_out_distinct_and_reservations_are_consumed():
    reg = Registry()
    ids = []
    for i in range(5):
        with reg.reservation(f"c{i}") as ident:
            ids.append(ident)
            meta = make_meta(f"c{i}", ident)
            reg.add(make_tensors(meta), meta)
    assert len(set(ids)) == 5
    assert reg.db.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0


def test_a_reservation_holds_its_name_and_identifier_until_released():
    reg = Registry()
    with reg.reservation("a") as first:
        with pytest.raises(DuplicateConcept, match="being trained"):
            with reg.reservation("a"):
                pass
        with reg.reservation("b") as second:
            assert second != first
    with reg.reservation("a") as again:  # released: both free again
        assert again == first


def test_identifiers_must_fit_the_tokenizer():
    reg = Registry()
    with reg.reservation("a", fits=lambda ident: ident.startswith("q")) as ident:
        assert ident.startswith("q")


def test_export_import_round_trip(tmp_path):
    reg = Registry()
    meta = make_meta()
    reg.add(make_tensors(meta), meta)
    exported = reg.export_pack("a", tmp_path / "out" / "a.safetensors")
    assert read_meta(exported) == meta
    reg.remove("a")
    record = reg.import_pack(exported)
    assert record.meta == meta
    renamed = reg.import_pack(exported, name="b")
    assert renamed.meta.name == "b" and read_meta(renamed.path).name == "b"
    torch.testing.assert_close(reg.load("b")[0], make_tensors(meta))


def test_truncated_pack_is_refused_and_the_registry_is_unchanged(tmp_path):
    reg = Registry()
    meta = make_meta()
    reg.add(make_tensors(meta), meta)
    good = reg.export_pack("a", tmp_path / "a.safetensors")
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(PackError):
            reg.import_pack(bad, name="b")
    assert [r.name for r in reg.list()] == ["a"]
    assert sorted(p.name for p in reg.packs_dir.iterdir()) == ["a.safetensors"]


def format1_json(meta) -> str:
    """Metadata as a format-1 writer wrote it: that era's fields, sorted keys."""
    return json.dumps({k: v for k, v in dataclasses.asdict(meta).items() if k in FORMAT1_FIELDS}, sort_keys=True)


def test_a_format1_pack_is_read_with_a_warning(tmp_path):
    meta = make_meta()
    path = tmp_path / "old.safetensors"
    save_file(make_tensors(meta), str(path), metadata={VERSION_KEY: "1", CONFIG_KEY: format1_json(meta)})
    with pytest.warns(UnverifiedPackWarning, match="without a content hash"):
        tensors, loaded = read_pack(path)
    assert loaded == meta and torch.equal(tensors["blk.0.up"], make_tensors(meta)["blk.0.up"])


@pytest.mark.parametrize("forgery", ["hash-stripped format 2", "extra metadata key", "extra field", "unsorted"])
def test_a_pack_that_only_claims_format1_is_refused(tmp_path, forgery):
    """Format 1 has no content hash; a file is read as format 1 only if a format-1 writer could have written it."""
    meta, tensors = make_meta(), make_tensors(make_meta())
    metadata = {VERSION_KEY: "1", CONFIG_KEY: format1_json(meta)}
    if forgery == "hash-stripped format 2":
        metadata[CONFIG_KEY] = meta.to_json()  # format 2's fields (family)
    elif forgery == "extra metadata key":
        metadata[CONTENT_KEY] = content_sha256(tensors, metadata[CONFIG_KEY])
    elif forgery == "extra field":
        metadata[CONFIG_KEY] = json.dumps({**json.loads(metadata[CONFIG_KEY]), "note": "x"}, sort_keys=True)
    else:
        metadata[CONFIG_KEY] = metadata[CONFIG_KEY].replace('{"', '{ "', 1)
    path = tmp_path / "claims1.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(PackError, match="claims pack format 1"):
        read_pack(path)


def test_pack_whose_tensors_do_not_match_its_metadata(tmp_path):
    meta = make_meta()
    tensors = make_tensors(meta)
    tensors["blk.1.up"] = torch.zeros(12, 4)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={VERSION_KEY: "1", CONFIG_KEY: format1_json(meta)})
    with pytest.warns(UnverifiedPackWarning), pytest.raises(PackError, match="shape"):
        read_pack(path)
    del tensors["blk.1.up"]
    save_file(tensors, str(path), metadata={VERSION_KEY: "1", CONFIG_KEY: format1_json(meta)})
    with pytest.warns(UnverifiedPackWarning), pytest.raises(PackError, match="missing"):
        read_pack(path)
    save_file(make_tensors(meta), str(path))
    with pytest.raises(PackError, match="not a persres pack"):
        read_pack(path)


def test_a_pack_changed_after_registration_is_refused():
    reg = Registry()
    meta = make_meta()
    record = reg.add(make_tensors(meta), meta)
    write_pack(record.path, make_tensors(meta, seed=5), meta)
    with pytest.raises(PackError, match="changed"):
        reg.load("a")


def test_migrations_apply_once(persres_home):
    reg = Registry()
    assert migrate(reg.db, reg.transaction) == []
    assert [r["name"] for r in reg.db["_migrations"].rows] == [name for name, _ in MIGRATIONS]
    Registry()  # reopening applies nothing new and keeps data
    assert [r["name"] for r in reg.db["_migrations"].rows] == [name for name, _ in MIGRATIONS]


def test_a_registry_from_before_in_channels_keeps_its_packs(persres_home):
    """A registry whose rows were written before m005: the column arrives with '{}' and every concept
    reads and loads as it did."""
    reg = Registry()
    meta = make_meta()
    reg.add(make_tensors(meta), meta)
    reg.conn.execute("DELETE FROM _migrations WHERE name = 'm005_in_channels'")
    reg.conn.execute("ALTER TABLE concepts DROP COLUMN in_channels")
    reg.conn.close()
    again = Registry()
    [record] = again.list()
    assert record.meta.in_channels == {} and record.meta == again.get("a").meta
    tensors, loaded = again.load("a")
    assert loaded.parameter_count == meta.parameter_count and set(tensors) == set(make_tensors(meta))


def test_settings():
    reg = Registry()
    assert reg.setting("default_model") is None
    reg.set_setting("default_model", "/models/sd14")
    assert Registry().setting("default_model") == "/models/sd14"
    reg.set_setting("default_model", None)
    assert reg.setting("default_model") is None


def test_doctor_reports_and_repairs_rows_and_files_that_disagree(persres_home):
    from typer.testing import CliRunner

    from persres.cli import app

    reg = Registry()
    for name in ("a", "b"):
        meta = make_meta(name, {"a": "sks", "b": "zwx"}[name])
        reg.add(make_tensors(meta), meta)
    (reg.packs_dir / "b.safetensors").unlink()  # a row without its pack
    stray = make_meta("stray", "qrv")
    write_pack(reg.packs_dir / "stray.safetensors", make_tensors(stray), stray)  # a pack without a row
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1 and "'b': its pack" in result.stdout, result.output
    assert "stray.safetensors" in result.stderr + result.stdout  # swept to orphans/ on start, with a note
    assert len((persres_home / "orphans" / "NOTES.txt").read_text().splitlines()) == 1  # one file moved, once
    repaired = CliRunner().invoke(app, ["doctor", "--repair"])
    assert repaired.exit_code == 0 and "row removed" in repaired.stdout
    clean = CliRunner().invoke(app, ["doctor"])
    assert clean.exit_code == 0 and "1 concepts, 0 damaged rows, 0 problems" in clean.stdout
    assert [r.name for r in Registry().list()] == ["a"]


def test_opening_the_registry_releases_reservations_of_finished_processes(persres_home):
    import socket
    import subprocess
    import sys

    reg = Registry()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    with reg.transaction():
        reg.db.execute("INSERT INTO reservations (name, identifier, pid, host, created_at) VALUES ('gone', 'zwx', ?, ?, 'x')",
                       [int(dead), socket.gethostname()])
        reg.db.execute("INSERT INTO reservations (name, identifier, pid, host, created_at) VALUES ('elsewhere', 'qrv', 1, 'other-host', 'x')")
    again = Registry()  # the next start sweeps
    held = [r[0] for r in again.db.execute("SELECT name FROM reservations").fetchall()]
    assert held == ["elsewhere"]  # a process on another machine may still run: kept
    assert again.doctor() == []


@pytest.mark.parametrize("loss", ["deleted", "garbage"])
def test_doctor_rebuild_restores_every_concept_from_its_packs(persres_home, loss):
    from typer.testing import CliRunner

    from persres.cli import app

    reg = Registry()
    for k, (name, identifier) in enumerate([("a", "sks"), ("b", "zwx"), ("c", "qrv"), ("d", "vyk")]):
        meta = make_meta(name, identifier)
        reg.add(make_tensors(meta, seed=k), meta)
    before = {r.name: (r.meta.identifier, r.sha256) for r in reg.list()}
    orphan = reg.packs_dir / "d.safetensors"
    reg.orphans_dir.mkdir(exist_ok=True)
    with reg.transaction():
        reg.db.execute("DELETE FROM concepts WHERE name = 'd'")
    os.replace(orphan, reg.orphans_dir / "20260101-000000-d.safetensors")  # a pack only orphans/ holds
    (reg.packs_dir / "junk.safetensors").write_bytes(b"not a pack")
    reg.db.conn.close()  # closed now, not whenever it is collected: a late close would checkpoint over the damage below
    db = persres_home / "registry.db"
    if loss == "deleted":
        for extra in ("", "-wal", "-shm"):
            Path(f"{db}{extra}").unlink(missing_ok=True)
    else:
        db.write_bytes(os.urandom(4096))
        for extra in ("-wal", "-shm"):
            Path(f"{db}{extra}").unlink(missing_ok=True)
        doctor = CliRunner().invoke(app, ["doctor"])  # the tool for this case opens what it can and says what to do
        assert doctor.exit_code == 1 and "persres doctor --rebuild" in doctor.stdout and "Traceback" not in doctor.output
    result = CliRunner().invoke(app, ["doctor", "--rebuild"])
    assert result.exit_code == 1, result.output  # one file was refused
    assert "3 concepts restored" not in result.stdout and "4 concepts restored, 1 files refused" in result.stdout
    assert "junk.safetensors" in result.stdout
    after = {r.name: (r.meta.identifier, r.sha256) for r in Registry().list()}
    assert {k: after[k] for k in "abc"} == {k: before[k] for k in "abc"}  # same identifiers, same files byte for byte
    assert after["d"][0] == before["d"][0]
    assert (loss == "garbage") == any(p.name.startswith("registry.db.broken-") for p in persres_home.iterdir())
    assert CliRunner().invoke(app, ["doctor"]).exit_code == 0


def test_doctor_rebuild_reads_packs_in_place_by_their_header_alone(persres_home, monkeypatch):
    import persres.packs
    from persres.registry.rebuild import rebuild

    reg = Registry()
    for k, (name, identifier) in enumerate([("a", "sks"), ("b", "zwx")]):
        meta = make_meta(name, identifier)
        reg.add(make_tensors(meta, seed=k), meta)
    before = {r.name: (r.meta.identifier, r.sha256) for r in reg.list()}
    reg.db.conn.close()
    for extra in ("", "-wal", "-shm"):
        Path(f"{persres_home / 'registry.db'}{extra}").unlink(missing_ok=True)

    def no_tensors(path, *args, **kwargs):
        raise AssertionError(f"{path}: tensors read where the header would do")

    monkeypatch.setattr(persres.packs, "read_pack", no_tensors)
    report = rebuild(persres_home)
    assert len(report.restored) == 2 and not report.refused
    assert {r.name: (r.meta.identifier, r.sha256) for r in Registry().list()} == before
