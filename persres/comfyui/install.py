"""`persres comfyui install [COMFYUI_DIR]`: persres's nodes in a ComfyUI installation.

It writes `COMFYUI_DIR/custom_nodes/persres/`: an `__init__.py` that imports the nodes from the
installed persres package (so ComfyUI must run in a Python that has persres), and the example
workflows in `example_workflows/`, where ComfyUI's template browser lists a node pack's examples.
Nothing else in ComfyUI's folder is touched; running it again brings the entry up to date.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from persres.comfyui import NODE_PACK
from persres.errors import InputError

MARKER = "# written by `persres comfyui install`"
ENTRY = f'''{MARKER}: persres's ComfyUI nodes, from the persres package this Python has.
try:
    from persres.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:
    raise ImportError(f"persres's ComfyUI nodes need persres in ComfyUI's Python: pip install persres ({{e}})") from None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def workflows() -> dict[str, str]:
    """The example workflows persres ships (ComfyUI's API format): file name -> JSON text."""
    folder = resources.files("persres.comfyui") / "workflows"
    return {f.name: f.read_text() for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".json")}


def comfyui_dir(given: str | Path | None) -> Path:
    """The ComfyUI folder: the one given, else `COMFYUI_PATH`; it must hold ComfyUI (`comfy/`, `nodes.py`)."""
    if given is None:
        given = os.environ.get("COMFYUI_PATH")
        if not given:
            raise InputError("give ComfyUI's folder (persres comfyui install PATH) or set COMFYUI_PATH")
    path = Path(given).expanduser()
    if not (path / "comfy").is_dir() or not (path / "nodes.py").is_file():
        raise InputError(f"{str(path)!r} is not a ComfyUI folder (no comfy/ and nodes.py in it)")
    return path


def install(given: str | Path | None = None) -> Path:
    """Write (or bring up to date) the `custom_nodes/persres` entry; returns its folder."""
    root = comfyui_dir(given)
    target = root / "custom_nodes" / NODE_PACK
    entry = target / "__init__.py"
    if target.exists() and not (entry.is_file() and entry.read_text(errors="replace").startswith(MARKER)):
        raise InputError(f"{str(target)!r} exists and was not written by persres: move it aside first")
    try:
        examples = target / "example_workflows"
        if examples.is_dir():
            shutil.rmtree(examples)
        examples.mkdir(parents=True)
        for name, text in workflows().items():
            (examples / name).write_text(text)
        entry.write_text(ENTRY)
    except OSError as e:
        raise InputError(f"cannot write {str(target)!r}: {e.strerror or e}") from None
    return target
