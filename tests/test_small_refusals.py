"""Inputs that used to pass in silence or be misread: each is now refused or warned by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from persres.cli import app
from persres.registry import Registry
from test_registry import make_meta, make_tensors

runner = CliRunner()


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_placeholder_no_concept_can_be_named_is_warned_about():
    from persres.tokens import unbound_placeholders

    assert unbound_placeholders("a <../checker> circle and <my dog>", []) == ["<../checker>", "<my dog>"]
    assert unbound_placeholders("a <checker> circle, <heart:0.8>", []) == []


def test_export_to_a_path_that_names_a_folder_is_refused(persres_home, tmp_path):
    meta = make_meta()
    Registry().add(make_tensors(meta), meta)
    line = one_line_error(runner.invoke(app, ["export", "a", "-o", f"{tmp_path}/newdir/"]))
    assert "names a folder: give a file name" in line
    assert not (tmp_path / "newdir").exists()


def test_a_blank_persres_model_is_named_not_sent_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSRES_MODEL", " ")
    line = one_line_error(runner.invoke(app, ["gen", "a circle", "--out", str(tmp_path)]))
    assert "$PERSRES_MODEL" in line and "empty value" in line


def test_a_32_bit_integer_image_keeps_its_tones():
    from persres.images import to_rgb

    ramp = (np.linspace(0, 2**31 - 1, 64 * 64).reshape(64, 64)).astype(np.int32)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp, "I")))
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135  # a ramp, not white


def test_an_unreadable_image_is_counted_with_its_reason(tmp_path, monkeypatch):
    from persres.errors import InputError
    from persres.images import read_folder

    folder = tmp_path / "refs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    real = Path.read_bytes

    def denied(self):
        if self.suffix == ".png":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.warns(UserWarning, match="Permission denied"), pytest.raises(InputError, match="could not be read, e.g. a.png: Permission denied"):
        read_folder(folder)


def test_list_and_show_flag_a_concept_whose_pack_file_is_gone(persres_home):
    meta = make_meta()
    record = Registry().add(make_tensors(meta), meta)
    record.path.unlink()
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "pack file missing" in listed.stdout
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout)[0]["problem"].startswith("pack file missing")
    assert json.loads(runner.invoke(app, ["show", "a", "--json"]).stdout)["problem"].startswith("pack file missing")


def test_heic_photos_are_named_and_skipped_files_counted(tmp_path, monkeypatch):
    """Without pillow-heif a folder of iPhone photos says what to do; with it, they are read."""
    import persres.images as images
    from persres.errors import InputError
    from persres.images import read_folder

    folder = tmp_path / "phone"
    folder.mkdir()
    for i in range(2):
        (folder / f"IMG_{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    monkeypatch.setattr(images, "heif_readable", lambda: False)
    with pytest.raises(InputError, match="pip install pillow-heif"):
        read_folder(folder)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match=r"skipped 3 of 6 files .*2 are HEIC/HEIF: HEIC/HEIF photos need `pip install pillow-heif`"):
        assert len(read_folder(folder)) == 3


@pytest.mark.parametrize("kind, expected", [("GatedRepoError", "is gated on the hub: accept its licence"),
                                            ("RepositoryNotFoundError", "is not on the hub under that id"),
                                            ("ConnectionError", "could not be fetched (ConnectionError)")])
def test_a_failed_download_says_what_to_do(kind, expected, monkeypatch):
    import diffusers
    from huggingface_hub import constants

    import persres.models
    from persres.errors import ModelNotFound
    from persres.models import local_snapshot

    error = type(kind, (Exception,), {})("refused")

    def download(cls, name, **kw):
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(persres.models.hub, "hub_unreachable", lambda endpoint: None)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", classmethod(download))
    with pytest.raises(ModelNotFound) as raised:
        local_snapshot("some-org/some-model")
    assert expected in str(raised.value)
