"""`persres comfyui install`: the custom_nodes entry, written into a folder shaped like ComfyUI's."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from persres.cli import app


def comfyui_folder(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "nodes.py").write_text("")
    return root


def test_install_writes_the_entry_and_the_example_workflows_and_rerunning_updates_it(tmp_path):
    root = comfyui_folder(tmp_path)
    first = CliRunner().invoke(app, ["comfyui", "install", str(root)])
    assert first.exit_code == 0, first.output
    entry = root / "custom_nodes" / "persres"
    assert "from persres.comfyui.nodes import NODE_CLASS_MAPPINGS" in (entry / "__init__.py").read_text()
    examples = sorted(p.name for p in (entry / "example_workflows").iterdir())
    assert examples == ["persres-one-concept.json", "persres-two-concepts.json"]
    two = json.loads((entry / "example_workflows" / "persres-two-concepts.json").read_text())
    assert {n["class_type"] for n in two.values()} >= {"PersresConcepts", "PersresRegions", "KSampler"}
    (entry / "example_workflows" / "stale.json").write_text("{}")
    again = CliRunner().invoke(app, ["comfyui", "install", str(root)])
    assert again.exit_code == 0 and not (entry / "example_workflows" / "stale.json").exists()


def test_install_refuses_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    runner = CliRunner()
    no_folder = runner.invoke(app, ["comfyui", "install"])
    assert no_folder.exit_code == 1 and "COMFYUI_PATH" in no_folder.output
    not_comfy = runner.invoke(app, ["comfyui", "install", str(tmp_path)])
    assert not_comfy.exit_code == 1 and "is not a ComfyUI folder" in not_comfy.output
    root = comfyui_folder(tmp_path)
    theirs = root / "custom_nodes" / "persres"
    theirs.mkdir(parents=True)
    (theirs / "__init__.py").write_text("# someone else's node pack\n")
    taken = runner.invoke(app, ["comfyui", "install", str(root)])
    assert taken.exit_code == 1 and "was not written by persres" in taken.output
    assert (theirs / "__init__.py").read_text() == "# someone else's node pack\n"
    for result in (no_folder, not_comfy, taken):
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "elsewhere"))
    assert "is not a ComfyUI folder" in runner.invoke(app, ["comfyui", "install"]).output
