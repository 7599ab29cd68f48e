"""Repair and removal never lose what the registry holds: `doctor --rebuild` under its lock, with the
settings carried over, finished after a kill; `rm` committed before its unlink; real processes
killed at each commit point (SIGKILL via PERSRES_FAULT) and racing one another."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from persres.registry import Registry
from persres.registry.lock import held, read_marker
from test_concurrency import consistent
from test_registry import make_meta, make_tensors

CONFIGURED = "/opt/models/my-sd"  # a setting to keep: the configured model


def persres(*args, home: Path, fault: str | None = None, model: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PERSRES_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    if model is not None:
        env["PERSRES_MODEL"] = str(model)
    env.pop("PERSRES_FAULT", None)
    if fault:
        env["PERSRES_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "persres", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def populate(home: Path, names=("a", "b", "c")) -> dict:
    """Packs registered, a setting set; returns {name: (identifier, sha256)}."""
    reg = Registry(home)
    for k, name in enumerate(names):
        meta = make_meta(name, ["sks", "zwx", "qrv", "vyk"][k])
        reg.add(make_tensors(meta, seed=k), meta)
    reg.set_setting("default_model", CONFIGURED)
    return {r.name: (r.meta.identifier, r.sha256) for r in reg.list()}


def holdings(home: Path) -> dict:
    """{name: (identifier, sha256)} of a registry found consistent (every row has its intact pack, every pack its row)."""
    return {r.name: (r.meta.identifier, r.sha256) for r in consistent(home).list()}


def test_a_rebuild_of_a_healthy_registry_keeps_its_settings_and_says_what_it_kept(persres_home):
    from persres.registry.rebuild import rebuild

    before = populate(persres_home)
    report = rebuild(persres_home)
    assert holdings(persres_home) == before
    assert Registry(persres_home).setting("default_model") == CONFIGURED
    assert any("default_model" in c for c in report.carried)
    assert [p.name.split("-")[0] for p in report.kept_aside if p.name.endswith(str(os.getpid()))] == ["registry.db.before"]
    assert not any(p.name.startswith("registry.db.broken-") for p in persres_home.iterdir())


def test_rebuilds_in_the_same_second_never_overwrite_a_kept_aside_database(persres_home):
    from persres.registry.rebuild import rebuild

    populate(persres_home)
    first, second = rebuild(persres_home), rebuild(persres_home)
    kept = [p for r in (first, second) for p in r.kept_aside]
    assert len(kept) == len(set(kept)) and all(p.exists() for p in kept)
    assert Registry(persres_home).setting("default_model") == CONFIGURED


def test_a_start_during_a_rebuild_waits_for_it_and_sweeps_nothing_away(persres_home, monkeypatch):
    """A rebuild holds the lock: a process starting then is told so (here, after a short wait)."""
    from persres.errors import RegistryError
    from persres.registry import store

    before = populate(persres_home)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.3)
    with held(persres_home, exclusive=True, timeout=5, what="test"):
        (persres_home / "registry.db").rename(persres_home / "registry.db.aside")  # what a rebuild does first
        with pytest.raises(RegistryError, match="being rebuilt"):
            Registry(persres_home)
        (persres_home / "registry.db.aside").rename(persres_home / "registry.db")
    assert holdings(persres_home) == before
    assert not (persres_home / "orphans").exists()


def test_a_write_after_a_rebuild_goes_to_the_new_database(persres_home):
    """A process that opened the registry before a rebuild (a training still running) registers its
    pack in the rebuilt database, not in the one kept aside."""
    from persres.registry.rebuild import rebuild

    populate(persres_home)
    running = Registry(persres_home)  # opened before the rebuild
    rebuild(persres_home)
    meta = make_meta("late", "vyk")
    running.add(make_tensors(meta, seed=9), meta)
    assert "late" in holdings(persres_home)


@pytest.mark.parametrize("point", ["rebuild-moved", "rebuild-restored"])
def test_a_rebuild_killed_midway_loses_nothing_and_the_next_one_finishes_it(persres_home, point):
    before = populate(persres_home)
    killed = persres("doctor", "--rebuild", home=persres_home, fault=point)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert read_marker(persres_home) is not None
    listing = persres("list", home=persres_home)
    out, err = listing.communicate(timeout=120)
    assert listing.returncode == 1 and err.count("\n") == 1 and "persres doctor --rebuild" in err, err
    assert sorted(p.name for p in (persres_home / "packs").iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    again = persres("doctor", "--rebuild", home=persres_home)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, (out, err)
    assert "finishing a rebuild that was interrupted" in out
    assert holdings(persres_home) == before
    assert Registry(persres_home).setting("default_model") == CONFIGURED


def test_rm_killed_after_its_commit_leaves_every_other_concept(persres_home):
    before = populate(persres_home)
    killed = persres("rm", "b", home=persres_home, fault="removed-row")
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    after = holdings(persres_home)  # opening sweeps the unlinked-to-be file into orphans/
    assert after == {k: v for k, v in before.items() if k != "b"}
    assert sorted(p.name for p in (persres_home / "packs").iterdir()) == ["a.safetensors", "c.safetensors"]
    assert Registry(persres_home).setting("default_model") == CONFIGURED


@pytest.mark.parametrize("point", ["temp-written", "linked", "inserted"])
def test_an_import_killed_at_any_point_leaves_every_registered_concept(persres_home, tmp_path, point):
    before = populate(persres_home)
    pack = Registry(persres_home).export_pack("a", tmp_path / "a.safetensors")
    killed = persres("import", pack, "--name", "copy", home=persres_home, fault=point)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    after = holdings(persres_home)
    assert {k: after[k] for k in before} == before
    assert set(after) in ({"a", "b", "c"}, {"a", "b", "c", "copy"})
    assert Registry(persres_home).setting("default_model") == CONFIGURED


def test_rebuilds_and_writers_racing_lose_nothing(persres_home, tmp_path, tiny_model, concept_dir):
    """A training, two rebuilds, an import, an rm and two listings started together: every concept not
    removed is there afterwards, with its file, and the setting too."""
    before = populate(persres_home, ("a", "b", "c", "d"))
    pack = Registry(persres_home).export_pack("a", tmp_path / "a.safetensors")
    training = persres("train", concept_dir, "--name", "new", "--class", "circle", "--steps", "2", home=persres_home, model=tiny_model)
    procs = [persres("doctor", "--rebuild", home=persres_home), persres("import", pack, "--name", "copy", home=persres_home),
             persres("doctor", "--rebuild", home=persres_home), persres("rm", "d", home=persres_home),
             persres("list", home=persres_home), persres("list", home=persres_home), training]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode in (0, 1) and "Traceback" not in err, err
    assert read_marker(persres_home) is None
    after = holdings(persres_home)
    assert {k: after[k] for k in "abc"} == {k: before[k] for k in "abc"}
    assert ("copy" in after) == (procs[1].returncode == 0)
    assert ("d" in after) == (procs[3].returncode != 0)
    assert training.returncode == 0 and "new" in after, results[-1]
    assert Registry(persres_home).setting("default_model") == CONFIGURED
    files = sorted(p.name for p in (persres_home / "packs").iterdir())
    assert files == sorted(f"{n}.safetensors" for n in after)


def test_a_registry_locked_past_the_timeout_says_so_in_one_line(persres_home, monkeypatch):
    import sqlite3

    from persres.errors import RegistryError
    from persres.registry import store

    populate(persres_home)
    blocker = sqlite3.connect(persres_home / "registry.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(RegistryError, match="stayed locked by another process"):
            reg = Registry(persres_home, sweep=False)
            reg.conn.execute("PRAGMA busy_timeout = 200")
            reg.sweep()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
