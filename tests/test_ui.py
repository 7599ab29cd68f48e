"""`persres ui` at its API, as `gradio_client` sees it: the app launched in-process on a free port
over the tiny SD model, every action and every bad input (message asserted, registry unchanged)."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from conftest import write_concept_images  # noqa: E402
from persres.registry import Registry  # noqa: E402
from persres.workspace import Workspace  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    import os

    from persres.ui.app import serve

    root = tmp_path_factory.mktemp("ui")
    home = root / "home"
    old = os.environ.get("PERSRES_HOME")
    os.environ["PERSRES_HOME"] = str(home)
    ws = Workspace(str(tiny_model))
    app, url = serve(ws, root / "out", port=free_port(), block=False)
    client = gradio_client.Client(url, verbose=False)
    yield client, ws, root, url
    app.close()
    if old is None:
        os.environ.pop("PERSRES_HOME", None)
    else:
        os.environ["PERSRES_HOME"] = old


@pytest.fixture(autouse=True)
def persres_home(served, monkeypatch):  # the app's registry, for every test of this module
    monkeypatch.setenv("PERSRES_HOME", str(served[1].registry.home))
    return served[1].registry.home


def snapshot(registry) -> tuple:
    return tuple(sorted((r.name, r.sha256) for r in registry.list())), tuple(sorted(p.name for p in registry.packs_dir.glob("*")))


def test_train_list_generate_with_and_without_lag_export_import(served):
    client, ws, root, _ = served
    refs = write_concept_images(root / "refs")
    images = [gradio_client.handle_file(str(p)) for p in sorted(refs.iterdir())]
    said = client.predict(images, "", "circ", "circle", 3, 1e-3, 0.05, api_name="/train")
    assert said.startswith("trained circ") and ws.registry.has("circ")
    assert ws.registry.reference_sheet("circ").is_file()  # the gallery's card
    meta = client.predict("circ", api_name="/show")
    assert meta["class_word"] == "circle" and meta["identifier"]

    gallery, regions = client.predict("a V* circle", ["circ"], True, 2, 6.0, 3, 2, "", ["circ"], api_name="/generate")
    assert len(gallery) == 4 and "circ:" in regions  # 2 images, each with its region overlay
    first = Image.open(gallery[0]["image"]) if isinstance(gallery[0], dict) else Image.open(gallery[0][0])
    assert first.size[0] > 0
    plain, regions = client.predict("a V* circle", ["circ"], False, 2, 6.0, 3, 2, "", [], api_name="/generate")
    assert len(plain) == 2 and regions == "no regions (LAG off)"
    files = sorted(p.name for p in (root / "out").glob("a-v-circle-circ-*.png"))
    assert any("-lag-" in f for f in files) and any("-nolag-" in f for f in files)
    png = next((root / "out").glob("a-v-circle-circ-lag-3.png"))
    assert Image.open(png).text["concepts"] == "circ" and Image.open(png).text["lag"] == "True"  # the CLI's metadata
    loaded = client.predict(gradio_client.handle_file(str(png)), api_name="/settings_from_png")
    assert list(loaded) == ["a V* circle", ["circ"], True, 2, 6.0, 3]

    compared = client.predict("a V* circle", ["circ"], 2, 6.0, 3, 1, "", api_name="/compare")
    assert [c["caption"] if isinstance(c, dict) else c[1] for c in compared] == ["LAG, seed 3", "no LAG, seed 3"]

    for fmt in ("persres", "kohya"):
        exported = client.predict("circ", fmt, api_name="/export")
        class_word = "" if fmt == "persres" else "circle"  # a pack keeps its own; a LoRA needs one
        back = client.predict(gradio_client.handle_file(exported), f"back{fmt}", class_word, api_name="/import")
        assert back.startswith(f"imported back{fmt}")
    assert ws.registry.get("backkohya").meta.ranks == ws.registry.get("circ").meta.ranks
    assert client.predict("backpersres", True, api_name="/remove") == "removed backpersres"
    assert not ws.registry.has("backpersres") and not ws.registry.reference_sheet("backpersres").exists()
    assert "no problems" in client.predict(api_name="/doctor")


def test_cancel_stops_a_training_and_registers_nothing(served):
    import time

    client, ws, root, _ = served
    before = snapshot(ws.registry)
    job = client.submit([], "toy:checker_circle", "slow", "circle", 100_000, 1e-3, 0.05, api_name="/train")
    deadline = time.monotonic() + 120
    while not ws.registry._live_reservation("slow"):  # the training has begun
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.1)
    assert client.predict(api_name="/cancel") == "cancelling..."
    with pytest.raises(Exception, match="training 'slow' cancelled: nothing was registered"):
        job.result(timeout=120)
    assert snapshot(ws.registry) == before and not ws.registry.has("slow")
    assert not ws.registry._live_reservation("slow")


def test_a_cli_train_shows_up_after_a_refresh(served, concept_dir):
    """The registry is the single source of truth: what another process registers, the app lists."""
    from typer.testing import CliRunner

    from persres.cli import app
    from persres.ui import actions

    client, ws, root, _ = served
    result = CliRunner().invoke(app, ["train", str(concept_dir), "--name", "fromcli", "--class", "circle", "--steps", "1",
                                      "--model", ws.model])
    assert result.exit_code == 0, result.output
    session = actions.Session(ws, root / "out")
    assert any(caption.startswith("fromcli ·") for _, caption in actions.gallery(session))


BAD = [
    ("no images", "/train", lambda root: ([], "", "x1", "circle", 2, 1e-3, 0.05), "drop 3-15 images"),
    ("a corrupt image", "/train", lambda root: ([gradio_client.handle_file(str(_file(root, "bad.png", b"not a png")))], "", "x2", "circle",
                                                2, 1e-3, 0.05), "no readable image"),
    ("a duplicate name", "/train", lambda root: ([], "toy:checker_circle", "circ", "circle", 2, 1e-3, 0.05), "already exists"),
    ("bad steps", "/train", lambda root: ([], "toy:checker_circle", "x3", "circle", 0, 1e-3, 0.05), "steps"),
    ("an unknown concept", "/generate", lambda root: ("a <nobody> circle", [], True, 2, 6.0, 0, 1, "", []), "unknown concept 'nobody'"),
    ("a strength out of range", "/generate", lambda root: ("a V* circle", ["circ:7"], True, 2, 6.0, 0, 1, "", []), "strength of 'circ'"),
    ("a bad size", "/generate", lambda root: ("a V* circle", ["circ"], True, 2, 6.0, 0, 1, "big", []), "size must be"),
    ("a tampered upload", "/import", lambda root: (gradio_client.handle_file(str(_tampered(root))), "", "", ), "content hash"),
    ("a text file as a pack", "/import", lambda root: (gradio_client.handle_file(str(_file(root, "t.safetensors", b"hello"))), "", ""),
     "not a readable pack"),
    ("remove without confirming", "/remove", lambda root: ("circ", False), "tick 'yes, remove circ'"),
    ("a PNG from elsewhere", "/settings_from_png", lambda root: (gradio_client.handle_file(str(_plain_png(root))),), "no persres settings"),
]


def _file(root, name, data: bytes):
    path = root / "bad" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _tampered(root):
    registry = Registry()
    pack = root / "bad" / "pack.safetensors"
    pack.parent.mkdir(exist_ok=True)
    registry.export_pack("circ", pack) if not pack.exists() else None
    data = bytearray(pack.read_bytes())
    data[-3] ^= 0x10
    out = root / "bad" / "tampered.safetensors"
    out.write_bytes(bytes(data))
    return out


def _plain_png(root):
    path = root / "bad" / "plain.png"
    path.parent.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


@pytest.mark.parametrize("case,endpoint,args,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_message_in_the_page_and_the_registry_is_unchanged(served, case, endpoint, args, expected):
    client, ws, root, _ = served
    if not ws.registry.has("circ"):
        ws.train("toy:checker_circle", "circ", "circle", steps=2)
    before = snapshot(ws.registry)
    with pytest.raises(Exception) as raised:
        client.predict(*args(root), api_name=endpoint)
    message = str(raised.value)
    assert expected in message and "Traceback" not in message, message
    assert snapshot(ws.registry) == before


def test_a_host_beyond_loopback_needs_auth():
    from persres.errors import InputError
    from persres.ui.app import check_exposure

    assert check_exposure("127.0.0.1", None) is None
    assert check_exposure("localhost", None) is None
    with pytest.raises(InputError, match="--auth USER:PASS"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(InputError, match="USER:PASS"):
        check_exposure("0.0.0.0", "nopassword")
    assert check_exposure("0.0.0.0", "me:secret") == ("me", "secret")


def test_the_cli_refuses_a_public_host_without_auth_in_one_line():
    from typer.testing import CliRunner

    from persres.cli import app

    result = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 would serve the app beyond this machine: add --auth USER:PASS (or keep the default 127.0.0.1)"]


def test_files_outside_the_allowed_folders_are_not_served(served, tmp_path):
    import urllib.error
    import urllib.request

    client, ws, root, url = served
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    for path in (secret, ws.registry.db_path, next(ws.registry.packs_dir.glob("*.safetensors"))):
        for route in (f"gradio_api/file={path}", f"file={path}"):
            try:
                with urllib.request.urlopen(url.rstrip("/") + "/" + route, timeout=10) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                assert e.code in (403, 404), (route, e.code)
                continue
            assert b"not for the page" not in body and b"SQLite" not in body, route


@pytest.mark.parametrize("args, expected", [
    (["--port", "99999"], "--port must be a whole number from 1 to 65535, got 99999"),
    (["--port", "0"], "--port must be a whole number from 1 to 65535, got 0"),
    (["--port", "-1"], "--port must be a whole number from 1 to 65535, got -1"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' cannot be resolved"),
    (["--host", "not a host!"], "--host 'not a host!' cannot be resolved"),
    (["--port", "BUSY"], "is already in use on 127.0.0.1: choose another with --port"),
    (["--out", "FILE"], "is a file, not a folder"),
])
def test_ui_options_are_refused_in_one_line_before_any_model(args, expected, tmp_path):
    """The model named cannot be had at all: a check made after resolving or loading it would fail
    with a model error instead of naming the option."""
    from typer.testing import CliRunner

    from persres.cli import app

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    (tmp_path / "file.txt").write_text("x")
    args = [str(busy.getsockname()[1]) if a == "BUSY" else str(tmp_path / "file.txt") if a == "FILE" else a for a in args]
    try:
        result = CliRunner().invoke(app, ["ui", *args, "--model", "no-such-org/no-such-model"])
    finally:
        busy.close()
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.stderr


def test_ipv6_loopback_is_loopback():
    from persres.ui.address import check_exposure, is_loopback

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    assert is_loopback("::1") and check_exposure("::1", None) is None
