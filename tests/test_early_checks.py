"""Options are checked before anything heavy: every bad value below names its option in one line
although the model named (a hub id, offline) cannot be had at all, so a check made after
resolving or loading the model would fail with a model error instead. Help goes to stdout."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from persres.cli import app

MODEL = "no-such-org/no-such-model"  # not on disk; HF_HUB_OFFLINE (conftest): resolving it fails in one line
runner = CliRunner()


def cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"x")
    empty, file = str(tmp_path / "empty"), str(tmp_path / "file.png")
    return [
        (["train", "toy:checker_circle", "--name", "a", "--class", "", "--model", MODEL], "class word"),
        (["train", empty, "--name", "a", "--class", "dog", "--model", MODEL], "is empty"),
        (["train", "toy:checker_circle", "--name", "a", "--class", "dog", "--steps", "0", "--model", MODEL], "--steps"),
        (["train", "toy:checker_circle", "--name", "a", "--class", "dog", "--precision", "fp8", "--model", MODEL], "--precision"),
        (["gen", "x", "--out", file, "--model", MODEL], "--out"),
        (["gen", "x", "--backend", "foo", "--model", MODEL], "unknown attention backend 'foo'"),
        (["gen", "x", "--backend", "xformers", "--model", MODEL], "attention backend 'xformers' is not available"),
        (["gen", "x", "-n", "0", "--model", MODEL], "-n"),
        (["gen", "x", "--save-masks", "--model", MODEL], "--save-masks"),
        (["suggest-class", "toy:checker_circle", "--candidates", "", "--model", MODEL], "--candidates holds no word"),
        (["suggest-class", "toy:checker_circle", "--candidates", ",,", "--model", MODEL], "--candidates holds no word"),
        (["suggest-class", "toy:checker_circle", "--budget", "0", "--model", MODEL], "--budget"),
        (["eval", str(tmp_path / "missing"), "--refs", empty, "--clip", MODEL, "--dino", MODEL], "sample folder"),
        (["eval", empty, "--refs", empty, "--clip", MODEL, "--dino", MODEL], "holds no images"),
        (["ui", "--port", "99999", "--model", MODEL], "--port"),
        (["train-many", empty, "--model", MODEL], "is a folder"),
        (["bench", "toy", "--steps", "-1", "--model", MODEL], "--steps"),
    ]


@pytest.mark.parametrize("k", range(17))
def test_a_bad_option_is_named_before_the_model_is_resolved(k, tmp_path):
    args, expected = cases(tmp_path)[k]
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert expected in lines[0] and MODEL not in lines[0], (args, lines[0])


def test_the_case_list_is_what_the_test_runs(tmp_path):
    assert len(cases(tmp_path)) == 17


@pytest.mark.parametrize("args", [[], ["config"], ["bench"]])
def test_help_of_a_bare_command_goes_to_stdout(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and result.stdout.startswith("Usage: ") and result.stderr == ""
