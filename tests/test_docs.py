"""The docs' examples run as written: every Python block of docs/python-api.md and of the
README's "Python API" section, in order, in one namespace, on the built-in toy model."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


@pytest.mark.parametrize("source", ["docs/python-api.md", "README.md#Python API"])
def test_every_python_example_runs_as_written(source, tmp_path, monkeypatch):
    path, _, section = source.partition("#")
    text = readme_section(section) if section else (ROOT / path).read_text()
    blocks = python_blocks(text)
    assert blocks, f"{source} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{source} block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"{source} block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e


def test_the_cli_reference_page_is_what_the_app_generates():
    from persres.cli.reference import markdown

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == markdown(), "docs/cli.md is stale: python -m persres.cli.reference > docs/cli.md"


@pytest.mark.parametrize("name", ["one-concept", "two-concepts"])
def test_the_comfyui_workflow_pictures_are_drawn_from_the_shipped_workflows(name):
    import json

    import numpy as np
    from PIL import Image

    from persres.comfyui.graph import draw
    from persres.comfyui.install import workflows

    drawn = np.asarray(draw(json.loads(workflows()[f"persres-{name}.json"])))
    committed = np.asarray(Image.open(ROOT / "docs" / "img" / f"comfyui-{name}.png").convert("RGB"))
    assert drawn.shape == committed.shape and (drawn == committed).all(), \
        f"docs/img/comfyui-{name}.png is stale: python -m persres.comfyui.graph persres/comfyui/workflows/persres-{name}.json docs/img/comfyui-{name}.png"
