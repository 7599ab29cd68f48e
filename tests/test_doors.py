"""The three doors, the Python API, the CLI and the web app, draw the same image for the same prompt
and seed on every model family, at the family's own sampling defaults."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from persres.cli import app
from persres.workspace import Workspace

PROMPT = "a red circle on a white background"
SIDE = 32  # px: every tiny pipeline draws this size in a few steps


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def through_each_door(model: str, tmp_path) -> dict[str, tuple[np.ndarray, dict]]:
    """{door: (pixels, PNG text)} for one image of PROMPT at seed 3, 2 steps, the family's guidance."""
    from persres.ui import actions

    ws = Workspace(model)
    api = ws.generate(PROMPT, steps=2, seed=3, height=SIDE, width=SIDE, out_dir=tmp_path / "api").image_paths[0]
    result = CliRunner().invoke(app, ["gen", PROMPT, "--steps", "2", "--seed", "3", "--height", str(SIDE), "--width", str(SIDE),
                                      "--model", model, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    [cli] = (tmp_path / "cli").glob("*.png")
    session = actions.Session(Workspace(model), tmp_path / "ui")
    guidance = actions.defaults(session)["guidance"]  # what the page's guidance box starts at
    cards, _ = actions.generate(session, PROMPT, [], False, 2, guidance, 3, 1, f"{SIDE}x{SIDE}", [])
    ui = cards[0][0]
    return {door: (pixels(path), Image.open(path).text) for door, path in (("api", api), ("cli", cli), ("ui", ui))}


@pytest.mark.parametrize("family, fixture", [("sd1", "tiny_model"), ("sd2", "tiny_linear_model"), ("sdxl", "tiny_xl_model"),
                                             ("flux", "tiny_flux")])
def test_the_same_image_through_every_door(family, fixture, request, tmp_path):
    from persres import families

    model = str(request.getfixturevalue(fixture))
    drawn = through_each_door(model, tmp_path)
    expected = families.get(family).guidance  # FLUX.1: 3.5; the paper's 6.0 on the rest
    for door, (image, text) in drawn.items():
        assert float(text["guidance"]) == expected, door
        assert np.array_equal(image, drawn["api"][0]), f"{door} differs from the Python API"


def test_workspace_generate_samples_flux_at_its_own_guidance_unless_told(tiny_flux):
    ws = Workspace(str(tiny_flux))
    assert ws.sample_config().guidance == 3.5 and ws.sample_config(guidance=5.0).guidance == 5.0
    default = ws.generate(PROMPT, steps=1, height=SIDE, width=SIDE).images[0]
    told = ws.generate(PROMPT, steps=1, height=SIDE, width=SIDE, guidance=3.5).images[0]
    other = ws.generate(PROMPT, steps=1, height=SIDE, width=SIDE, guidance=6.0).images[0]
    assert np.array_equal(np.asarray(default), np.asarray(told))
    assert not np.array_equal(np.asarray(default), np.asarray(other))


def test_the_family_defaults_apply_when_the_family_is_known_only_after_loading(tiny_flux, tmp_path):
    """A hub id not yet downloaded has no family to read from files: the defaults come from the
    pipeline once it is loaded, not from the paper's."""
    ws = Workspace(str(tiny_flux))
    ws.__dict__["_family_from_files"] = None  # as for a model whose files are not on this machine yet
    assert ws.sample_config().guidance == 6.0  # nothing known yet
    path = ws.generate(PROMPT, steps=1, height=SIDE, width=SIDE, out_dir=tmp_path).image_paths[0]
    assert float(Image.open(path).text["guidance"]) == 3.5
