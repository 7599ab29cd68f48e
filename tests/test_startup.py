"""The registry commands start without a model library: a real `persres` process per command,
asked afterwards which modules it loaded."""

import json
import os
import subprocess
import sys

import pytest

from persres.workspace import Workspace

PROBE = """
import json, sys
from persres.cli import main
sys.argv = ["persres", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "safetensors.torch", "pandas") if m in sys.modules)
slow = sorted(m for m in ("pydantic", "sqlite_utils") if m in sys.modules)
print("LOADED=" + json.dumps({"code": code, "heavy": heavy, "slow": slow}))
"""


def loaded_by(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, env=env, timeout=120)
    line = next(l for l in done.stdout.splitlines() if l.startswith("LOADED="))
    return json.loads(line.removeprefix("LOADED="))


@pytest.fixture
def registered(tiny_model, concept_dir):
    Workspace(str(tiny_model)).train(concept_dir, "one", "circle", overrides={"steps": 1})


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["show", "one"], ["show", "one", "--json"], ["doctor"],
                                  ["config", "model"], ["--help"], ["train", "--help"], ["--version"], ["rm", "one"]],
                         ids=lambda a: " ".join(a))
def test_registry_commands_never_import_torch(registered, args):
    got = loaded_by(args)
    assert got["code"] in (0, None), got
    assert got["heavy"] == [], got


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["doctor"], ["--help"], ["--version"]], ids=lambda a: " ".join(a))
def test_flag_only_commands_on_a_migrated_registry_skip_pydantic_and_sqlite_utils(registered, args):
    got = loaded_by(args)
    assert got["code"] in (0, None), got
    assert got["slow"] == [], got


def test_a_registry_that_needs_a_migration_still_gets_it(tmp_path, monkeypatch):
    from persres.registry import Registry
    from persres.registry.migrations import MIGRATIONS

    first = Registry(tmp_path)
    first.conn.execute("DELETE FROM _migrations WHERE name = ?", [MIGRATIONS[-1][0]])
    first.conn.execute("ALTER TABLE concepts DROP COLUMN layers")  # what the last migration (m006) adds
    first.conn.execute("ALTER TABLE concepts DROP COLUMN everywhere")
    first.conn.close()
    again = Registry(tmp_path)
    assert [r[0] for r in again.conn.execute("SELECT name FROM _migrations")] == [name for name, _ in MIGRATIONS]
    assert {"layers", "everywhere"} <= {r[1] for r in again.conn.execute("PRAGMA table_info(concepts)")}


def test_every_command_names_the_module_that_registers_it():
    from persres.cli import COMMAND_MODULES, app

    registered = {c.name or c.callback.__name__.replace("_", "-"): [c.callback.__module__] for c in app.registered_commands}
    registered |= {g.name: [c.callback.__module__ for c in g.typer_instance.registered_commands] for g in app.registered_groups}
    assert set(registered) == set(COMMAND_MODULES)
    for name, modules in registered.items():
        assert modules and set(modules) == {f"persres.cli.{COMMAND_MODULES[name]}"}, name


LAZY_PROBE = """
import sys
from persres.cli import main
sys.argv = ["persres", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("MODULES=" + ",".join(sorted(m for m in sys.modules if m.startswith("persres.cli."))))
"""


@pytest.mark.parametrize("args, modules", [(["list"], {"root", "concepts"}), (["config", "model"], {"root", "concepts"}),
                                           (["--help"], {"root", "train", "gen", "concepts", "train_many", "bench", "ui", "comfyui", "progress"})],
                         ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_a_command_loads_only_its_own_module(tmp_path, args, modules):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PERSRES_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", LAZY_PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    line = next(l for l in done.stdout.splitlines() if l.startswith("MODULES="))
    assert set(line.removeprefix("MODULES=").split(",")) == {f"persres.cli.{m}" for m in modules}
