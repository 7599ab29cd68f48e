"""Many concepts and the benchmark on several processes (torchrun + gloo on the CPU, as
`accelerate launch` starts them): every unit done once, results equal to one process's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_concept_images

pytest.importorskip("accelerate")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun`, whatever PATH holds
CONCEPTS = ("checker_circle", "split_square", "striped_heart", "dotted_triangle")


def persres(home: Path, *args, processes: int = 1, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`persres ARGS` in a fresh process (or `processes` of them under torchrun), with its own home.
    One torch thread per process in both cases, so 1- and 2-process runs compute alike."""
    env = {**os.environ, "PERSRES_HOME": str(home), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "persres", *map(str, args)]
    else:
        cmd = [*TORCHRUN, "--nproc_per_node", str(processes), "--standalone", "-m", "persres", *map(str, args)]
    return run_group(cmd, env=env, cwd=cwd)


def run_group(cmd, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, all of it killed on timeout (torchrun's workers included)."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    lines = ["images,name,class,steps,seed"]
    for i, concept in enumerate(CONCEPTS):
        write_concept_images(root / "imgs" / concept, concept, n=3, seed=i)
        lines.append(f"imgs/{concept},{concept.split('_')[0]},{concept.split('_')[1]},3,{i}")
    lines.append("imgs/missing,ghost,dog,3,0")  # fails; the others go on
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def rows(result) -> list[dict]:
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:  # a rank failed before rank 0 printed: say what it said
        raise AssertionError(f"no JSON on stdout ({result.stdout[:200]!r}); exit {result.returncode}\n{why(result.stderr)}") from None


def packs(home: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    return {p.stem: load_file(str(p)) for p in sorted((home / "packs").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def one_process(manifest, tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("home1")
    result = persres(home, "train-many", manifest, "--model", tiny_model, "--device", "cpu", "--json")
    assert result.returncode == 1, result.stderr  # the ghost row
    return home, rows(result)


def check_same_as_one_process(home: Path, got: list[dict], one_process) -> None:
    home1, expected = one_process
    assert [(r["name"], r["status"], r["identifier"]) for r in got] == [(r["name"], r["status"], r["identifier"]) for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit for bit
    mine, theirs = packs(home), packs(home1)
    assert set(mine) == set(theirs) == {"checker", "split", "striped", "dotted"}  # none missing, none extra
    for name in mine:
        for key in theirs[name]:
            assert mine[name][key].equal(theirs[name][key]), (name, key)
    listed = json.loads(persres(home, "list", "--json").stdout)
    assert len({c["identifier"] for c in listed}) == len(listed) == 4


@pytest.mark.parametrize("attempt", range(3))  # gloo start-up and shutdown races show up across runs
def test_train_many_on_two_processes_equals_one(attempt, manifest, tiny_model, one_process, tmp_path):
    result = persres(tmp_path / "home", "train-many", manifest, "--model", tiny_model, "--device", "cpu", "--json", processes=2)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "terminate called" not in result.stderr
    got = rows(result)
    assert sorted(r["index"] for r in got) == list(range(5))  # every row reported exactly once
    assert {r["rank"] for r in got} == {0, 1}  # and the work was shared
    assert next(r for r in got if r["name"] == "ghost")["message"].startswith("image folder")
    check_same_as_one_process(tmp_path / "home", got, one_process)
    again = persres(tmp_path / "home", "train-many", manifest, "--model", tiny_model, "--device", "cpu", "--json", processes=2)
    assert [r["status"] for r in rows(again)] == ["skipped"] * 4 + ["failed"]  # resumable: nothing retrained


def test_train_many_shards_leave_sqlite_to_rank_zero(manifest, tiny_model, one_process, tmp_path):
    out = tmp_path / "out"
    result = persres(tmp_path / "home", "train-many", manifest, "--model", tiny_model, "--device", "cpu", "--json",
                     "--shards", "--out", out, processes=2)
    assert result.returncode == 1, result.stderr[-2000:]
    assert sorted(p.stem for p in (out / "shards").glob("*.safetensors")) == ["checker", "dotted", "split", "striped"]
    check_same_as_one_process(tmp_path / "home", rows(result), one_process)


def test_train_many_reports_bad_rows_and_goes_on(manifest, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from persres.cli import app

    bad = tmp_path / "bad.jsonl"
    good_images = manifest.parent / "imgs" / "checker_circle"
    bad.write_text("\n".join([
        json.dumps({"images": str(good_images), "name": "ok", "class": "circle", "steps": 1}),
        "not json",
        json.dumps({"images": str(good_images), "name": "ok", "class": "circle"}),
        json.dumps({"images": str(good_images), "name": "neg", "class": "circle", "steps": -1}),
        json.dumps({"images": str(good_images), "name": "x", "class": "circle", "colour": "red"}),
        json.dumps({"images": str(good_images), "class": "circle"}),
    ]) + "\n")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_progress_bar()  # as a fresh process has it
    result = CliRunner().invoke(app, ["train-many", str(bad), "--model", str(tiny_model), "--json"])
    assert result.exit_code == 1
    assert "Loading pipeline components" not in result.stderr  # diffusers' per-component bars stay quiet
    got = {r["index"]: r for r in json.loads(result.stdout)}
    assert got[0]["status"] == "trained"
    assert "not a JSON object" in got[1]["message"]
    assert "on an earlier row" in got[2]["message"]
    assert "--steps" in got[3]["message"] and got[3]["message"].startswith("line 4: ")  # every row's problem names its line
    assert "unknown field" in got[4]["message"]
    assert "missing name" in got[5]["message"]
    for text, expected in (("images,name\n", "missing column(s) class"), ("images,name,class,color\n", "unknown column(s) color")):
        (tmp_path / "h.csv").write_text(text + "a,b,c" + (",d" if "color" in text else "") + "\n")
        result = CliRunner().invoke(app, ["train-many", str(tmp_path / "h.csv")])
        assert result.exit_code == 1 and expected in result.output and len(result.output.strip().splitlines()) == 1


def test_launched_without_accelerate_is_one_line(tmp_path, manifest):
    code = ("import sys; sys.modules['accelerate'] = None\n"  # as if it were not installed
            "from persres.cli import main; main()")
    env = {**os.environ, "PERSRES_HOME": str(tmp_path), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "-c", code, "train-many", str(manifest)], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: this command was launched as several processes, which needs "
                                                  "accelerate: pip install 'persres[scale]'"]


def test_split_gives_every_unit_to_exactly_one_process(tmp_path):
    script = tmp_path / "split.py"
    script.write_text(
        "import json, sys\n"
        "from persres.scale import cluster\n"
        "with cluster('cpu') as here:\n"
        "    for n in (0, 1, 7, 10):\n"
        "        mine = here.split(list(range(n)))\n"
        "        everyone = here.gather([[here.rank, mine]])\n"
        "        if here.main:\n"
        "            print(json.dumps([n, everyone]))\n")
    result = run_group([*TORCHRUN, "--nproc_per_node", "2", "--standalone", str(script)], timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for line in result.stdout.strip().splitlines():
        n, everyone = json.loads(line)
        units = sorted(u for _, mine in everyone for u in mine)
        assert units == list(range(n))  # none twice, none missing
        assert {rank for rank, _ in everyone} == {0, 1}


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    from persres.testing import build_mini_cc101, build_tiny_scorers

    root = tmp_path_factory.mktemp("cc101")
    clip, dino = build_tiny_scorers(root / "scorers")
    return build_mini_cc101(root / "cc101"), clip, dino


def why(stderr: str) -> str:
    """What a failed rank said (its one-line persres error or traceback), not only torchrun's trailer."""
    said = [line for line in stderr.splitlines() if "error" in line.lower() and "elastic" not in line and "ChildFailed" not in line]
    return "\n".join(said[:20]) + "\n...\n" + stderr[-1500:]


def bench(home: Path, out: Path, bench_inputs, tiny_model, processes: int):
    cc101, clip, dino = bench_inputs
    return persres(home, "bench", "customconcept101", "--root", cc101, "--model", tiny_model, "--clip", clip, "--dino", dino,
                   "--multiconcept", "--prompts-per-concept", "2", "--samples-per-prompt", "2", "--steps", "2",
                   "--train-steps", "2", "--device", "cpu", "--out", out, processes=processes)


def outputs(out: Path) -> dict[str, object]:
    found = {}
    for p in sorted(out.rglob("*")):
        if p.suffix == ".png" and p.name != "figure.png":
            found[str(p.relative_to(out))] = np.asarray(Image.open(p)).tobytes()
        elif p.name == "scores.json":
            found[str(p.relative_to(out))] = json.loads(p.read_text())
    return found


def test_bench_on_two_processes_equals_one(bench_inputs, tiny_model, tmp_path):
    one = bench(tmp_path / "h1", tmp_path / "b1", bench_inputs, tiny_model, 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = bench(tmp_path / "h2", tmp_path / "b2", bench_inputs, tiny_model, 2)
    assert two.returncode == 0, why(two.stderr)
    a, b = outputs(tmp_path / "b1"), outputs(tmp_path / "b2")
    assert len(a) == 2 * (2 * 2 + 2 * 2 + 1 * 2) + 6  # modes x (circle, heart, pair) prompts x samples, + 6 scores
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert (tmp_path / "b1" / "results.csv").read_text() == (tmp_path / "b2" / "results.csv").read_text()
    # an interrupted (here: finished) sharded run resumes with another number of processes and redoes nothing
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "b2").rglob("*.png") if p.name != "figure.png"}
    again = bench(tmp_path / "h2", tmp_path / "b2", bench_inputs, tiny_model, 1)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_ragged_csv_row_is_named_as_such():
    from persres.manifest import _csv_records

    text = "images,name,class\nimgs/a,one,dog\nimgs/b,two,dog,extra,more\n"
    records = _csv_records(text, Path("m.csv"))
    assert records[0][1] == {"images": "imgs/a", "name": "one", "class": "dog"}
    assert records[1] == (3, {"__bad__": "2 more value(s) than the header's 3 columns (a comma inside a value needs quotes)"})


def test_a_manifest_with_a_bom_a_folder_and_wrong_json_types(tmp_path):
    """What spreadsheets write ("CSV UTF-8" starts with a BOM) reads; a folder and JSON values of the
    wrong type are each named for what they are."""
    from persres.errors import InputError
    from persres.manifest import read_manifest

    (tmp_path / "m.csv").write_bytes("images,name,class\nimgs/a,one,dog\n".encode("utf-8-sig"))
    [row] = read_manifest(tmp_path / "m.csv")
    assert (row.name, row.class_word, row.problem) == ("one", "dog", None)
    with pytest.raises(InputError, match="is a folder; give the .csv or .jsonl file in it"):
        read_manifest(tmp_path)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"images": "a", "name": 5, "class": "dog"},
        {"images": "a", "name": "x", "class": ["dog"]},
        {"images": "a", "name": "y", "class": "dog", "steps": "many"},
        {"images": "a", "name": "z", "class": "dog", "steps": 2.5},
        {"images": "a", "name": "w", "class": "dog", "lr": True},
    ]) + "\n")
    problems = [r.problem for r in read_manifest(tmp_path / "m.jsonl")]
    assert problems == ["line 1: name must be text, got 5", 'line 2: class must be text, got ["dog"]',
                        "line 3: steps must be an integer, got 'many'", "line 4: steps must be an integer, got 2.5",
                        "line 5: lr must be a number, got true"]
