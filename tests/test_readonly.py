"""A registry this user cannot write still lists, shows and exports; writing commands name the
permission problem. The home is made read-only for real: a read-only bind mount of it in a
private mount namespace (`unshare --mount`), where even root cannot write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from persres.workspace import Workspace


def read_only(home, *args: str) -> subprocess.CompletedProcess:
    """`persres ARGS` with `home` mounted read-only for that process alone."""
    cmd = f'mount --bind "{home}" "{home}" && mount -o remount,ro,bind "{home}" && exec "{sys.executable}" -m persres "$@"'
    env = {**os.environ, "PERSRES_HOME": str(home)}
    return subprocess.run(["unshare", "--mount", "sh", "-c", cmd, "persres", *args], capture_output=True, text=True, env=env, timeout=300)


def can_mount(tmp_path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "--mount", "sh", "-c", f'mount --bind "{probe}" "{probe}" && mount -o remount,ro,bind "{probe}" '
                           f'&& ! touch "{probe}/x" 2>/dev/null'], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def home(tmp_path, tiny_model, concept_dir, persres_home):
    if not can_mount(tmp_path):
        pytest.skip("needs unshare --mount and a read-only bind mount (root in a mount namespace)")
    Workspace(str(tiny_model)).train(concept_dir, "one", "circle", overrides={"steps": 1})
    return persres_home


@pytest.mark.parametrize("pending_log", [False, True], ids=["checkpointed", "write-ahead log pending"])
def test_read_commands_work_on_a_read_only_registry(home, tmp_path, pending_log):
    import sqlite3

    if pending_log:  # a change still in the write-ahead log, as after a crash or with another process open
        keep = sqlite3.connect(home / "registry.db")
        keep.execute("PRAGMA wal_autocheckpoint = 0")
        keep.execute("INSERT INTO settings (key, value) VALUES ('probe', 'x')")
        keep.commit()
        assert (home / "registry.db-wal").stat().st_size > 0
    else:
        sqlite3.connect(home / "registry.db").execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
        for extra in ("-wal", "-shm"):
            (home / f"registry.db{extra}").unlink(missing_ok=True)
    listed = read_only(home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["name"] for c in json.loads(listed.stdout)] == ["one"]
    shown = read_only(home, "show", "one", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["class_word"] == "circle", shown.stderr
    out = tmp_path / "one.safetensors"
    exported = read_only(home, "export", "one", "-o", str(out))
    assert exported.returncode == 0 and out.stat().st_size > 0, exported.stderr
    assert read_only(home, "doctor").returncode == 0


def test_writing_to_a_read_only_registry_names_the_permission(home, concept_dir, tiny_model):
    for args in (["train", str(concept_dir), "--name", "two", "--class", "circle", "--steps", "1", "--model", str(tiny_model)],
                 ["rm", "one"]):
        done = read_only(home, *args)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert "not writable by this user" in lines[0] and "move it aside" not in lines[0], lines[0]
