import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from persres.cli import app
from persres.registry import Registry

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, match):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert match in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def all_commands():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    return [[n] for n in names] + [["config"], ["config", "model"]]


@pytest.mark.parametrize("command", all_commands())
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    help_text = result.output.split("Usage", 1)[1]
    assert len(help_text.strip().splitlines()) > 2


@pytest.fixture
def trained(tiny_model, concept_dir):
    result = run("train", concept_dir, "--name", "mydog", "--class", "circle", "--model", tiny_model, "--steps", "3")
    assert result.exit_code == 0, result.output
    return tiny_model


def test_train_list_show_gen_export_import_rm(trained, tmp_path, second_concept_dir):
    model = trained
    listed = json.loads(run("list", "--json").stdout)
    assert [c["name"] for c in listed] == ["mydog"] and listed[0]["identifier"] == "sks"
    assert json.loads(run("show", "mydog", "--json").stdout)["class_word"] == "circle"
    assert "mydog" in run("list").stdout

    out = tmp_path / "out"
    result = run("gen", "a V* circle on a red background", "-c", "mydog", "--model", model, "--steps", "2", "--out", out, "-n", "2", "--seed", "7")
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert len(paths) == 2
    meta = Image.open(paths[1]).text
    assert meta["seed"] == "8" and meta["concepts"] == "mydog" and meta["lag"] == "False"
    assert meta["prompt"] == "a V* circle on a red background" and meta["expanded_prompt"] == "a sks circle on a red background"
    assert meta["steps"] == "2" and meta["guidance"] == "6.0" and meta["model"] == str(model)

    result = run("gen", "a <mydog> circle", "--model", model, "--steps", "2", "--out", out, "--lag", "--save-masks", "-n", "3", "--sheet")
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert Image.open(paths[0]).text["lag"] == "True"
    assert len(list(out.glob("*.mask-mydog.png"))) == 3
    side = Image.open(paths[0]).width
    sheet = Image.open(paths[-1])  # 3 images over 3 masks, each enlarged to >= 128 px by a whole factor
    scale = -(-128 // side)
    assert paths[-1].endswith("-sheet.png") and sheet.size == (3 * side * scale + 8, 2 * side * scale + 4)
    assert sheet.getpixel((0, 0)) == Image.open(paths[0]).convert("RGB").getpixel((0, 0))

    assert run("train", second_concept_dir, "--name", "mycat", "--class", "heart", "--model", model, "--steps", "2").exit_code == 0
    result = run("gen", "a V1 circle and a V2 heart", "-c", "mydog", "-c", "mycat", "--model", model, "--steps", "2", "--out", out, "--lag")
    assert result.exit_code == 0, result.output
    assert Image.open(result.stdout.split()[0]).text["concepts"] == "mydog,mycat"

    pack = tmp_path / "mydog.safetensors"
    assert run("export", "mydog", "-o", pack).exit_code == 0
    assert run("rm", "mydog").exit_code == 0
    assert [c["name"] for c in json.loads(run("list", "--json").stdout)] == ["mycat"]
    result = run("import", pack, "--name", "mydog2")
    assert result.exit_code == 0, result.output
    assert json.loads(run("show", "mydog2", "--json").stdout)["identifier"] == "sks"


def test_first_use_of_the_default_toy_model_says_so_once(monkeypatch, tiny_model):
    from persres import models

    monkeypatch.setattr(models.names, "TOY_DIR", tiny_model)
    first = run("gen", "a red circle", "--steps", "1", "--out", tiny_model.parent / "o")
    assert first.exit_code == 0, first.output
    assert "toy model" in first.stderr
    second = run("gen", "a red circle", "--steps", "1", "--out", tiny_model.parent / "o")
    assert "toy model" not in second.stderr


def test_config_model(tmp_path, tiny_model):
    assert run("config", "model").stdout.strip() == "toy"
    assert run("config", "model", str(tiny_model)).stdout.strip() == str(tiny_model)
    assert Registry().setting("default_model") == str(tiny_model)
    assert run("config", "model", "someorg/some-model").stdout.strip() == "someorg/some-model"
    assert run("config", "model", "--unset").stdout.strip() == "toy"
    assert_one_line_error(run("config", "model", str(tmp_path / "nowhere")), "not a diffusers directory")
    assert_one_line_error(run("config", "model", str(tmp_path)), "without model_index.json")
    assert_one_line_error(run("config", "model", "not a hub id"), "neither a local diffusers directory nor a hub id")
    assert Registry().setting("default_model") is None


def test_corrupt_image_is_skipped_with_a_warning(tiny_model, concept_dir):
    (concept_dir / "broken.png").write_bytes(b"\x89PNG not really")
    result = run("train", concept_dir, "--name", "a", "--class", "circle", "--model", tiny_model, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.stderr and "warning" in result.stderr
    assert len(Registry().get("a").meta.image_hashes) == 4


def test_error_missing_folder(tmp_path, tiny_model):
    assert_one_line_error(run("train", tmp_path / "nope", "--name", "a", "--class", "dog", "--model", tiny_model), "does not exist")


def test_error_empty_folder(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("train", tmp_path / "empty", "--name", "a", "--class", "dog", "--model", tiny_model), "is empty")


def test_error_no_readable_image(tmp_path, tiny_model):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"garbage")
    (folder / "notes.txt").write_text("hello")
    assert_one_line_error(run("train", folder, "--name", "a", "--class", "dog", "--model", tiny_model), "no readable image")


@pytest.mark.parametrize("option,value,match", [("--steps", "0", "--steps must be >= 1"), ("--rank", "0", "--rank must be >= 1"), ("--steps", "-3", "--steps must be >= 1")])
def test_error_non_positive_numbers(concept_dir, tiny_model, option, value, match):
    assert_one_line_error(run("train", concept_dir, "--name", "a", "--class", "dog", "--model", tiny_model, option, value), match)
    assert Registry().list() == []


def test_error_duplicate_name(trained, concept_dir):
    before = Registry().get("mydog").sha256
    assert_one_line_error(run("train", concept_dir, "--name", "mydog", "--class", "dog", "--model", trained, "--steps", "1"), "already exists")
    assert Registry().get("mydog").sha256 == before


def test_error_invalid_name(concept_dir, tiny_model):
    assert_one_line_error(run("train", concept_dir, "--name", "my dog/../x", "--class", "dog", "--model", tiny_model), "invalid concept name")


@pytest.mark.parametrize(
    "args,match",
    [
        (["gen", "a V* dog", "-c", "nobody"], "unknown concept 'nobody'"),
        (["gen", "a <nobody> dog"], "unknown concept 'nobody'"),
        (["gen", "a V2 dog", "-c", "mydog"], "V2 is not bound"),
        (["gen", "a dog", "-c", "mydog"], "is not in the prompt"),
        (["gen", " ".join(["red"] * 40) + " V* circle", "-c", "mydog", "--steps", "1"], "cut off"),
        (["gen", "a V* circle", "-c", "mydog", "--steps", "0"], "--steps must be >= 1"),
        (["gen", "a V* circle", "-c", "mydog", "--save-masks"], "add --lag"),
        (["show", "nobody"], "unknown concept"),
        (["rm", "nobody"], "unknown concept"),
        (["export", "nobody", "-o", "x.safetensors"], "unknown concept"),
    ],
)
def test_gen_and_registry_errors(trained, args, match, tmp_path):
    result = run(*args, "--model", trained, "--out", tmp_path) if args[0] == "gen" else run(*args)
    assert_one_line_error(result, match)


def test_error_truncated_pack_import(trained, tmp_path):
    pack = tmp_path / "p.safetensors"
    run("export", "mydog", "-o", pack)
    pack.write_bytes(pack.read_bytes()[:-100])
    assert_one_line_error(run("import", pack, "--name", "other"), "truncated")
    assert_one_line_error(run("import", tmp_path / "missing.safetensors"), "does not exist")
    assert [r.name for r in Registry().list()] == ["mydog"]


def test_error_model_not_available_offline(concept_dir, tmp_path):
    assert_one_line_error(run("train", concept_dir, "--name", "a", "--class", "dog", "--model", "nobody/no-such-model"), "could not be fetched")
    assert_one_line_error(run("train", concept_dir, "--name", "a", "--class", "dog", "--model", tmp_path / "nodir"), "not a diffusers directory")


def test_ctrl_c_during_training_leaves_the_registry_as_it_was(trained, concept_dir, monkeypatch):
    from persres.workspace import Workspace

    before = [(r.name, r.sha256) for r in Registry().list()]

    def interrupt(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Workspace(str(trained)).train(concept_dir, "b", "circle", overrides={"steps": 5}, progress=interrupt)
    assert [(r.name, r.sha256) for r in Registry().list()] == before
    assert sorted(p.name for p in Registry().packs_dir.iterdir()) == ["mydog.safetensors"]


def test_training_prompt_template(concept_dir, tiny_model):
    result = run("train", concept_dir, "--name", "t", "--class", "circle", "--model", tiny_model, "--steps", "1",
                 "--prompt", "a {identifier} {class_word} on a blue background")
    assert result.exit_code == 0, result.output
    assert json.loads(run("show", "t", "--json").stdout)["train_config"]["prompt"] == "a sks circle on a blue background"
    bad = run("train", concept_dir, "--name", "u", "--class", "circle", "--model", tiny_model, "--prompt", "a photo of a dog")
    assert_one_line_error(bad, "must contain {identifier} and {class_word}")


def documented_defaults(command) -> list[str]:
    """Every "[default: ...]" / "[paper: ...]" text in a command's option help strings."""
    import re

    texts = []
    for param in command.params:
        texts += re.findall(r"\[(?:default|paper)[^\]]*\]", getattr(param, "help", None) or "")
    return texts


def every_command():
    import typer

    group = typer.main.get_command(app)
    stack = [((), group)]
    while stack:
        path, cmd = stack.pop()
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append(((*path, name), sub))
        if not getattr(cmd, "commands", None):
            yield path, cmd


def test_help_shows_every_documented_default_as_written():
    checked = 0
    for path, cmd in every_command():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
        text = " ".join(result.output.split())
        for default in documented_defaults(cmd):
            assert " ".join(default.split()) in text, (path, default)
            checked += 1
    assert checked >= 20


def precision_part(unet_config) -> str:
    """What the settings line says of an auto precision on this machine, and why."""
    import torch

    from persres.models import choose_dtype

    dtype, why = choose_dtype("auto", torch.device("cpu"), unet_config)
    return f"precision {'bf16' if dtype is torch.bfloat16 else 'fp32'} (auto: {why})"


def test_train_prints_its_effective_settings_and_show_records_them(tiny_model, concept_dir, tmp_path):
    import shutil

    from persres.models import unet_config_of

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "persres_defaults.json").write_text('{"train": {"lr": 0.02}}')
    result = run("train", concept_dir, "--name", "s", "--class", "circle", "--model", model, "--steps", "2", "--scale-min", "0.5",
                 "--lr-schedule", "cosine", "--snr-gamma", "5")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("settings: "))
    for part in ("steps 2 (option)", "scale_min 0.5 (option)", "lr_schedule cosine (option)", "snr_gamma 5.0 (option)", "flip True (persres)", "lr 0.02 (model default)", "batch_size 4 (paper)", "rank_ratio 0.05 (paper)",
                 "init zero (persres)", "device cpu (auto)", precision_part(unet_config_of(str(model)))):
        assert part in line, line
    sources = json.loads(run("show", "s", "--json").stdout)["train_config"]["sources"]
    assert sources["lr"] == "model default" and sources["steps"] == "option"


def test_gen_strength_zero_draws_what_the_base_model_draws_and_is_recorded(trained, tmp_path):
    import numpy as np

    with_zero = run("gen", "a V* circle", "-c", "mydog:0", "--model", trained, "--steps", "2", "--out", tmp_path / "zero", "--lag")
    assert with_zero.exit_code == 0, with_zero.output
    identifier = Registry().get("mydog").meta.identifier
    base = run("gen", f"a {identifier} circle", "--model", trained, "--steps", "2", "--out", tmp_path / "base")
    assert base.exit_code == 0, base.output
    (zero_png,), (base_png,) = (list((tmp_path / d).glob("*.png")) for d in ("zero", "base"))
    assert np.array_equal(np.asarray(Image.open(zero_png)), np.asarray(Image.open(base_png)))
    assert Image.open(zero_png).text["strengths"] == "0"
    assert_one_line_error(run("gen", "a V* circle", "-c", "mydog:3", "--model", trained, "--out", tmp_path), "from 0 to 2")


def test_gen_prints_every_file_it_writes(trained, tmp_path):
    out = tmp_path / "o"
    result = run("gen", "a V* circle", "-c", "mydog", "--model", trained, "--steps", "2", "-n", "2", "--lag",
                 "--save-masks", "--sheet", "--out", out)
    assert result.exit_code == 0, result.output
    printed = {str(p) for p in result.stdout.split()}
    written = {str(p) for p in out.iterdir()}
    assert printed == written and len(written) == 5  # 2 images, 2 masks, 1 sheet


def test_gen_draws_a_bar_on_a_terminal_and_plain_lines_otherwise(trained, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "120"}
    args = [sys.executable, "-m", "persres", "gen", "a V* circle", "-c", "mydog", "--model", str(trained), "--steps", "3",
            "-n", "2", "--out", str(tmp_path / "o")]
    code, on_tty = on_a_terminal(args, env)
    assert code == 0 and "generating" in on_tty and "steps" in on_tty, on_tty
    assert "━" in on_tty  # the bar
    piped = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    lines = piped.stderr.splitlines()
    assert piped.returncode == 0 and [line.split()[:2] for line in lines] == [["generating", f"{k}/6"] for k in (2, 4, 6)]  # 2 images a step, piped.stderr
    assert "\x1b" not in piped.stderr and "━" not in piped.stderr


def on_a_terminal(args, env) -> tuple[int, str]:
    import os
    import pty
    import subprocess

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(args, stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(primary)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_train_shows_its_phases_on_a_terminal(tiny_model, concept_dir, persres_home):
    import os
    import sys

    env = {**os.environ, "COLUMNS": "160", "PERSRES_HOME": str(persres_home)}
    code, seen = on_a_terminal([sys.executable, "-m", "persres", "train", str(concept_dir), "--name", "tty", "--class", "circle",
                                "--model", str(tiny_model), "--steps", "200"], env)
    import re

    seen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", seen)  # the terminal's colors and cursor moves
    assert code == 0, seen
    assert seen.index("loading ") < seen.index("encoding the references") < seen.index("training") < seen.index("trained tty"), seen
    assert "loss" in seen


def test_shipped_toy_concepts_train_from_any_directory(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("train", "toy:checker_circle", "--name", "c", "--class", "circle", "--model", tiny_model, "--steps", "1")
    assert result.exit_code == 0, result.output
    assert len(Registry().get("c").meta.image_hashes) == 5
    assert_one_line_error(run("train", "toy:nope", "--name", "d", "--class", "circle", "--model", tiny_model), "unknown toy concept 'nope'")


def test_images_are_normalized_by_mode(tmp_path):
    import numpy as np
    from PIL import Image as PILImage

    from persres.images import to_rgb

    sixteen = PILImage.fromarray(np.full((8, 8), 30000, dtype=np.uint16))  # 16-bit gray: mid-gray, not white
    assert to_rgb(sixteen).getpixel((0, 0)) == (117, 117, 117)
    clear = PILImage.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white after compositing
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(PILImage.new("LA", (4, 4), (0, 255))).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(PILImage.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    wide = PILImage.new("RGB", (6, 2), (10, 20, 30))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    wide.save(tmp_path / "rot.jpg", exif=exif)
    with PILImage.open(tmp_path / "rot.jpg") as im:
        assert to_rgb(im).size == (2, 6)


def test_few_or_small_references_warn_but_train(tiny_model, tmp_path):
    from conftest import write_concept_images

    folder = write_concept_images(tmp_path / "two", n=2)
    result = run("train", folder, "--name", "two", "--class", "circle", "--model", tiny_model, "--steps", "1")
    assert result.exit_code == 0 and "only 2 reference image(s)" in result.stderr, result.output
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(3):
        Image.new("RGB", (1, 1), (i, 0, 0)).save(tiny / f"{i}.png")
    result = run("train", tiny, "--name", "tiny", "--class", "circle", "--model", tiny_model, "--steps", "1")
    assert result.exit_code == 0 and "smaller than the training resolution" in result.stderr, result.output


def test_gen_never_overwrites_and_names_what_made_each_image(trained, tmp_path):
    out = tmp_path / "out"
    common = ("--model", trained, "--steps", "1", "--out", out)
    first = run("gen", "a V* circle", "-c", "mydog", *common).stdout.split()
    weaker = run("gen", "a V* circle", "-c", "mydog:0.5", *common).stdout.split()
    lag = run("gen", "a V* circle", "-c", "mydog", "--lag", *common).stdout.split()
    again = run("gen", "a V* circle", "-c", "mydog", *common).stdout.split()
    names = [p.rsplit("/", 1)[-1] for p in first + weaker + lag + again]
    assert names == ["a-v-circle-mydog-nolag-0.png", "a-v-circle-mydog0.5-nolag-0.png", "a-v-circle-mydog-lag-0.png",
                     "a-v-circle-mydog-nolag-0-2.png"]
    assert len(set(names)) == len(list(out.iterdir())) == 4
    assert Image.open(weaker[0]).text["strengths"] == "0.5"
    replaced = run("gen", "a V* circle", "-c", "mydog", "--overwrite", *common).stdout.split()
    assert replaced == first and len(list(out.iterdir())) == 4


def test_a_model_to_download_shows_its_progress_before_training_starts(tiny_model, concept_dir, monkeypatch):
    """A hub id not in the cache: diffusers downloads it with the hub's progress bars enabled (the
    CLI quiets only the per-component loading bars), and only then does training begin."""
    import diffusers
    from huggingface_hub.utils import are_progress_bars_disabled

    import persres.train

    order = []

    def fake_download(name, **kwargs):
        order.append(("download", name, are_progress_bars_disabled()))
        return str(tiny_model)

    real_train = persres.train.train_residuals

    def train(*args, **kwargs):
        order.append(("train",))
        return real_train(*args, **kwargs)

    from huggingface_hub import constants

    import persres.models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the hub is "reachable": the download is the fake one
    monkeypatch.setattr(persres.models.hub, "hub_unreachable", lambda endpoint: None)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", classmethod(lambda cls, name, **kw: fake_download(name, **kw)))
    monkeypatch.setattr(persres.train, "train_residuals", train)
    result = run("train", concept_dir, "--name", "hub", "--class", "circle", "--model", "someorg/some-model", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert order == [("download", "someorg/some-model", False), ("train",)]
    assert "downloading someorg/some-model from the Hugging Face hub" in result.stderr
    assert Registry().get("hub").meta.base_model == "someorg/some-model"  # the pack names the hub id, not the cache folder


def test_library_warnings_are_shown_once_and_deprecations_of_persres_calls_are_not(capsys):
    import importlib

    cli_app = importlib.import_module("persres.cli.root")

    library = "/usr/lib/python3/site-packages/diffusers/schedulers/scheduling_ddim.py"
    ours = cli_app.PACKAGE_DIR + "/models.py"
    for _ in range(2):
        cli_app._show_warning("the scheduler changed its default: images differ", UserWarning, library, 1)
        cli_app._show_warning("`torch_dtype` is deprecated", FutureWarning, ours, 1)  # about persres's own call
    cli_app._show_warning("this output will change in 1.0", FutureWarning, library, 2)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning (diffusers): the scheduler changed its default: images differ",
                     "warning (diffusers): this output will change in 1.0"]


@pytest.mark.parametrize("prompt,loose", [("a <mydog:1.5 circle on a red background", "'<mydog:1.5'"), ("a V1 circle", "'V1'")])
def test_a_placeholder_that_binds_nothing_is_warned_and_the_image_still_written(trained, tmp_path, prompt, loose):
    result = run("gen", prompt, "--model", trained, "--steps", "1", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and loose in warned[0] and "binds to no concept" in warned[0], result.stderr
    assert len(result.stdout.split()) == 1  # the image


def test_v0_is_not_a_placeholder(trained, tmp_path):
    assert_one_line_error(run("gen", "a V0 circle", "-c", "mydog", "--model", trained, "--out", tmp_path / "o"), "V0 is not a placeholder")


@pytest.mark.parametrize("option,value", [("--samples", "-1"), ("--samples", "0"), ("--seeds", "0"), ("--steps", "0")])
def test_bench_toy_refuses_bad_counts_before_any_training(tiny_model, tmp_path, option, value):
    result = run("bench", "toy", "--concept", "checker_circle", "--model", tiny_model, "--out", tmp_path / "b", option, value)
    assert_one_line_error(result, f"{option} must be at least 1")
    assert Registry().list() == []  # nothing trained or registered first


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                                                  "you tried to allocate 68719476736 bytes")])
def test_out_of_memory_is_a_designed_message(trained, tmp_path, monkeypatch, failure):
    import persres.workspace

    def no_memory(*args, **kwargs):
        raise failure

    monkeypatch.setattr(persres.workspace.Workspace, "generate", no_memory)
    result = run("gen", "a V* circle", "-c", "mydog", "--model", trained, "--out", tmp_path / "o")
    assert_one_line_error(result, "out of memory")
    assert "internal error" not in result.stderr


def test_an_image_too_large_for_pil_is_named_with_its_size_and_the_limit(tmp_path):
    from conftest import write_concept_images
    from persres.images import read_folder

    folder = write_concept_images(tmp_path / "refs", n=3)
    Image.new("1", (20000, 20000)).save(folder / "huge.png")  # 400 M pixels: PIL's decompression-bomb guard
    with pytest.warns(UserWarning, match=r"huge.png: 20000 x 20000 = 400,000,000 pixels is over the 178,956,970 pixels PIL opens"):
        assert len(read_folder(folder)) == 3


def test_a_pack_far_beyond_its_base_weights_is_refused_with_numbers(trained, tmp_path):
    """A valid, correctly hashed pack whose factors are huge (a flipped exponent, a bad tool): no image."""
    from persres.packs import read_pack, write_pack

    reg = Registry()
    tensors, meta = read_pack(reg.get("mydog").path)
    tensors = {k: v * 1e4 if k.endswith(".up") else v for k, v in tensors.items()}
    huge = tmp_path / "huge.safetensors"
    write_pack(huge, tensors, meta.__class__(**{**meta.__dict__, "name": "huge"}))
    assert run("import", huge).exit_code == 0
    out = tmp_path / "o"
    result = run("gen", "a V* circle", "-c", "huge", "--model", trained, "--steps", "1", "--out", out)
    assert_one_line_error(result, "pack 'huge' is damaged: its residual on")
    assert "x the base weight's" in result.stderr and list(out.glob("*.png")) == []


def test_non_finite_pixels_are_never_written(trained, tmp_path):
    import math

    from persres.config import SampleConfig
    from persres.errors import GenerationError
    from persres.workspace import Workspace

    ws = Workspace(str(trained))
    pipe = ws.pipeline()
    def poison(module, args, output):  # the UNet's prediction goes NaN, as a broken residual would make it
        (output[0] if isinstance(output, tuple) else output.sample).fill_(math.nan)

    hook = pipe.unet.register_forward_hook(poison)
    try:
        with pytest.raises(GenerationError, match="non-finite .* with concept\\(s\\) 'mydog'"):
            ws.generate("a V* circle", ["mydog"], SampleConfig(steps=1), out_dir=tmp_path / "o")
    finally:
        hook.remove()
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
