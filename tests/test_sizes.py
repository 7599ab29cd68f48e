"""Sizes the model or the machine cannot do are refused before any work; long runs print progress lines."""

import pytest
from typer.testing import CliRunner

from persres import sizes
from persres.cli import app
from persres.registry import Registry

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result, *parts):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(p in lines[0] for p in parts), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def native(tiny_model):
    from persres.models import load_pipeline

    return sizes.native_side(load_pipeline(str(tiny_model)))


def test_a_size_far_past_the_models_is_refused_before_any_work(tiny_model, concept_dir, native, tmp_path):
    big = native * 8
    result = run("gen", "a red circle", "--model", tiny_model, "--steps", "1", "--height", big, "--width", big, "--out", tmp_path / "o")
    one_error(result, f"{big} px is 8x the model's native {native} px", "--force-size")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    result = run("train", concept_dir, "--name", "big", "--class", "dog", "--model", tiny_model, "--resolution", big, "--steps", "1")
    one_error(result, "the training size", "--force-size")
    assert Registry().list() == [] and Registry().db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0


def test_past_twice_native_a_warning_and_with_force_size_the_run(tiny_model, native, tmp_path):
    result = run("gen", "a red circle", "--model", tiny_model, "--steps", "1", "--height", native * 3, "--out", tmp_path / "o")
    assert result.exit_code == 0 and f"{native * 3} px is 3x the model's native" in result.stderr, result.stderr
    result = run("gen", "a red circle", "--model", tiny_model, "--steps", "1", "--height", native * 5, "--force-size",
                 "--out", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    from PIL import Image

    assert Image.open(result.stdout.split()[-1]).size == (native, native * 5)


def test_a_run_beyond_the_memory_available_is_refused_with_both_numbers(tiny_model, concept_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(sizes, "available_bytes", lambda device: 2**20)  # a machine with 1 MB free
    result = run("gen", "a red circle", "--model", tiny_model, "--steps", "1", "-n", "8", "--out", tmp_path / "o")
    one_error(result, "needs ~", "this machine has 1 MB available")
    result = run("train", concept_dir, "--name", "m", "--class", "dog", "--model", tiny_model, "--steps", "1")
    one_error(result, "needs ~", "--batch-size")
    assert Registry().list() == []


def test_the_estimate_grows_with_pixels_batch_and_width(pipe):
    one = sizes.needed_bytes(pipe, 64, 64, 1, training=False)
    assert sizes.needed_bytes(pipe, 128, 128, 1, training=False) == 4 * one
    assert sizes.needed_bytes(pipe, 64, 64, 3, training=False) == 3 * one
    assert sizes.needed_bytes(pipe, 64, 64, 1, training=True) > 2 * one
    wider = {**pipe.unet.config, "block_out_channels": [2 * c for c in pipe.unet.config["block_out_channels"]]}
    assert sizes.unet_width(wider) == 2 * sizes.unet_width(pipe.unet.config)


def test_without_a_terminal_generation_prints_progress_lines(tiny_model, tmp_path):
    result = run("gen", "a red circle", "--model", tiny_model, "--steps", "20", "--out", tmp_path / "o")
    lines = [line for line in result.stderr.splitlines() if line.startswith("generating ")]
    assert [line.split()[1] for line in lines] == [f"{k}/20" for k in range(2, 21, 2)], result.stderr
