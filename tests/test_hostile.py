"""Hostile input: every case must end with exit code 1, exactly one line on stderr (an
`error:` line), no traceback, and the registry and its packs exactly as they were.

The cases run the real CLI in-process against a copy of one registry that holds two
trained concepts of the tiny model. Most fail before any model is loaded, so the suite is fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import write_concept_images
from persres import families
from persres.cli import app
from persres.packs import CONFIG_KEY, CONTENT_KEY, VERSION_KEY, content_sha256

runner = CliRunner()


@dataclass
class World:
    """What the cases may refer to: a registry home, a model, folders and files."""

    home: Path
    model: Path
    refs: Path
    pack: Path  # a valid exported pack of concept "one"
    tmp: Path
    files: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    """A registry with two trained concepts ("one", "two") and an exported pack."""
    root = tmp_path_factory.mktemp("hostile-base")
    home = root / "home"
    env = {"PERSRES_HOME": str(home), "PERSRES_MODEL": str(tiny_model)}
    refs = write_concept_images(root / "refs")
    for name in ("one", "two"):
        result = runner.invoke(app, ["train", str(refs), "--name", name, "--class", "circle", "--steps", "1"], env=env)
        assert result.exit_code == 0, result.output
    pack = root / "one.safetensors"
    assert runner.invoke(app, ["export", "one", "-o", str(pack)], env=env).exit_code == 0
    return root, home, refs, pack


def snapshot(home: Path):
    """Rows of every table and the packs folder's files with their hashes."""
    con = sqlite3.connect(f"file:{home / 'registry.db'}?mode=ro", uri=True)
    try:
        rows = {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall()))
                for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
    finally:
        con.close()
    packs = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((home / "packs").iterdir())}
    return rows, packs, (home / "orphans").exists()


@pytest.fixture
def world(base, tmp_path, tiny_model, monkeypatch):
    root, home, refs, pack = base
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    monkeypatch.setenv("PERSRES_HOME", str(copy))
    monkeypatch.setenv("PERSRES_MODEL", str(tiny_model))
    return World(copy, tiny_model, refs, pack, tmp_path)


# --- helpers that build bad inputs ------------------------------------------------------------
def pack_parts(world: World):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(world.pack), framework="pt") as f:
        meta = json.loads(f.metadata()[CONFIG_KEY])
    return load_file(str(world.pack)), meta


def write_pack_with(world: World, name: str, meta_change=None, tensor_change=None, version="2", hashed=True) -> Path:
    """A pack whose metadata (or tensors) are changed, re-hashed so only validation can catch it."""
    tensors, meta = pack_parts(world)
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    meta_json = json.dumps(meta, sort_keys=True)
    metadata = {VERSION_KEY: version, CONFIG_KEY: meta_json}
    if hashed:
        metadata[CONTENT_KEY] = content_sha256(tensors, meta_json)
    path = world.tmp / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def flipped(world: World, position: float, bit: int = 0) -> Path:
    data = bytearray(world.pack.read_bytes())
    header = int.from_bytes(data[:8], "little")
    # position < 0: into the JSON header (fraction of it); otherwise into the tensor data
    i = 8 + int(-position * header) if position < 0 else 8 + header + int(position * (len(data) - 8 - header - 1))
    data[i] ^= 1 << bit
    path = world.tmp / f"flip-{i}-{bit}.safetensors"
    path.write_bytes(bytes(data))
    return path


def fifo(world: World, name="fifo") -> Path:
    path = world.tmp / name
    os.mkfifo(path)
    return path


def folder_with(world: World, files: dict[str, bytes]) -> Path:
    folder = world.tmp / "imgs"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def damage_db(world: World, how: str) -> None:
    db = world.home / "registry.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file first
    con.close()
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    if how == "garbage":
        db.write_bytes(os.urandom(4096))
    elif how == "truncated":
        db.write_bytes(db.read_bytes()[:100])
    elif how == "newer":
        con = sqlite3.connect(db)
        con.execute("INSERT INTO _migrations (name) VALUES ('m999_from_the_future')")
        con.commit()
        con.close()
    elif how == "columns":
        con = sqlite3.connect(db)
        con.execute("ALTER TABLE concepts DROP COLUMN sha256")
        con.commit()
        con.close()
    elif how == "folder":
        db.unlink()
        db.mkdir()


# --- the cases ---------------------------------------------------------------------------------
BAD_NAMES = ["", " ", "a b", "evil\n", "\nevil", "../x", "a/b", "x" * 65, "ünï", "a.b", ".hidden", "a:b", "$(id)",
             "a\tb", "_lead", "a;b", "a*b", "名前", "a\\b"]
NUMBERS_TRAIN = [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "2"), ("--lr", "abc"),
                 ("--steps", "0"), ("--steps", "-5"), ("--steps", "10000000"), ("--steps", "1.5"),
                 ("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "5000"),
                 ("--rank", "0"), ("--rank", "-1"), ("--rank", "100000000"), ("--rank-ratio", "0"), ("--rank-ratio", "1.5"),
                 ("--rank-ratio", "nan"), ("--rank-ratio", "-0.1"), ("--resolution", "7"), ("--resolution", "0"),
                 ("--resolution", "-8"), ("--resolution", "100000"), ("--seed", "-1"), ("--seed", str(2**64)),
                 ("--seed", "99999999999999999999999"), ("--init", "bogus"), ("--prompt", "no placeholders"),
                 ("--prompt", "{identifier} only"), ("--precision", "fp16"), ("--precision", "fp64"), ("--device", "tpu")]
NUMBERS_GEN = [("--steps", "0"), ("--steps", "-1"), ("--steps", "2000"), ("--steps", "abc"), ("--guidance", "nan"),
               ("--guidance", "inf"), ("--guidance", "-1"), ("--guidance", "1000"), ("-n", "0"), ("-n", "-1"),
               ("-n", "100001"), ("--seed", "-1"), ("--seed", str(2**64)), ("--seed", "99999999999999999999999"),
               ("--height", "7"), ("--height", "0"), ("--height", "-8"), ("--height", "100000"), ("--width", "12"),
               ("--backend", "bogus"), ("--precision", "fp16"), ("--precision", "bogus"), ("--device", "tpu")]
BAD_CLASS = ["", "   ", "x" * 100, "a\nb", "\t"]
META_CHANGES = {
    "name-int": lambda m: m.update(name=5), "name-bad": lambda m: m.update(name="a b"),
    "name-newline": lambda m: m.update(name="evil\n"), "identifier-empty": lambda m: m.update(identifier=""),
    "identifier-space": lambda m: m.update(identifier=" "), "identifier-digits": lambda m: m.update(identifier="sks2"),
    "identifier-int": lambda m: m.update(identifier=5), "identifier-null": lambda m: m.update(identifier=None),
    "class-empty": lambda m: m.update(class_word=""), "class-spaces": lambda m: m.update(class_word="  "),
    "class-int": lambda m: m.update(class_word=5), "class-newline": lambda m: m.update(class_word="a\nb"),
    "class-long": lambda m: m.update(class_word="x" * 65), "ranks-list": lambda m: m.update(ranks=[1, 2]),
    "ranks-empty": lambda m: m.update(ranks={}), "ranks-zero": lambda m: m.update(ranks={k: 0 for k in m["ranks"]}),
    "ranks-string": lambda m: m.update(ranks={k: str(v) for k, v in m["ranks"].items()}),
    "ranks-above-channels": lambda m: m.update(ranks={k: m["channels"][k] + 1 for k in m["ranks"]}),
    "channels-missing-block": lambda m: m.update(channels=dict(list(m["channels"].items())[1:])),
    "channels-null": lambda m: m.update(channels=None), "params-wrong": lambda m: m.update(parameter_count=7),
    "params-string": lambda m: m.update(parameter_count="7"), "params-bool": lambda m: m.update(parameter_count=True),
    "base-int": lambda m: m.update(base_model=5), "architecture-null": lambda m: m.update(architecture=None),
    "weights-list": lambda m: m.update(weights=[]), "proj-out": lambda m: m.update(proj_out="Conv3d"),
    "train-config-list": lambda m: m.update(train_config=[]), "hashes-string": lambda m: m.update(image_hashes="x"),
    "hashes-ints": lambda m: m.update(image_hashes=[1]), "created-int": lambda m: m.update(created_at=5),
    "loss-high": lambda m: m.update(loss_start="high"), "loss-nan": lambda m: m.update(loss_end=float("nan")),
    "loss-bool": lambda m: m.update(loss_start=True), "seconds-object": lambda m: m.update(seconds={}),
    "missing-name": lambda m: m.pop("name"), "missing-ranks": lambda m: m.pop("ranks"),
    "missing-channels": lambda m: m.pop("channels"),
}


# what each changed pack's one line must name: the offending field
META_FIELD = {key: {"name": "'name'", "identifier": "'identifier'", "class": "'class_word'", "ranks": "'ranks'", "channels": "'channels'",
                    "params": "'parameter_count'", "base": "'base_model'", "architecture": "'architecture'", "weights": "'weights'",
                    "proj": "'proj_out'", "train": "'train_config'", "hashes": "'image_hashes'", "created": "'created_at'",
                    "seconds": "'seconds'", "missing": f"missing field '{key.split('-', 1)[-1]}'"}.get(key.split("-")[0])
              for key in META_CHANGES}
META_FIELD |= {"loss-high": "'loss_start'", "loss-nan": "'loss_end'", "loss-bool": "'loss_start'", "channels-missing-block": "'ranks'"}
TENSOR_PROBLEM = {"nan": "non-finite", "inf": "non-finite", "shape": "has shape", "int-dtype": "int32", "missing": "missing", "extra": "extra.up"}


def _first_tensor(t, fn):
    key = sorted(t)[0]
    t[key] = fn(t[key])


TENSOR_CHANGES = {
    "nan": lambda t: _first_tensor(t, lambda x: torch.full_like(x, float("nan"))),
    "inf": lambda t: _first_tensor(t, lambda x: torch.full_like(x, float("inf"))),
    "shape": lambda t: _first_tensor(t, lambda x: torch.zeros(x.shape[0], x.shape[1] + 1)),
    "int-dtype": lambda t: _first_tensor(t, lambda x: x.to(torch.int32)),
    "missing": lambda t: t.pop(sorted(t)[0]),
    "extra": lambda t: t.update({"extra.up": torch.zeros(2, 2)}),
}


def cases():
    out = []  # (id, setup(world) -> args, expected text in the error line)
    for i, name in enumerate(BAD_NAMES):
        out.append((f"train-name-{i}", lambda w, n=name: ["train", w.refs, "--name", n, "--class", "circle"], "invalid concept name"))
        out.append((f"import-name-{i}", lambda w, n=name: ["import", w.pack, "--name", n], "invalid concept name"))
        if name.strip() and not name.startswith("-"):
            out.append((f"show-name-{i}", lambda w, n=name: ["show", n], "unknown concept"))
            out.append((f"rm-name-{i}", lambda w, n=name: ["rm", n], "unknown concept"))
    out.append(("train-existing-name", lambda w: ["train", w.refs, "--name", "one", "--class", "circle"], "already exists"))
    out.append(("import-existing-name", lambda w: ["import", w.pack], "already exists"))
    for opt, value in NUMBERS_TRAIN:
        out.append((f"train{opt}={value}", lambda w, o=opt, v=value: ["train", w.refs, "--name", "new", "--class", "circle", o, v], opt.split("-")[-1] if opt != "--prompt" else "prompt"))
    for opt, value in NUMBERS_GEN:
        out.append((f"gen{opt}={value}", lambda w, o=opt, v=value: ["gen", "a V* circle", "-c", "one", "--out", w.tmp / "o", o, v], {"-n": "-n"}.get(opt, opt.lstrip("-").split("-")[0])))
    for i, cls in enumerate(BAD_CLASS):
        out.append((f"train-class-{i}", lambda w, c=cls: ["train", w.refs, "--name", "new", "--class", c], "class word"))
    # paths: training folders
    out += [
        ("train-missing-folder", lambda w: ["train", w.tmp / "nope", "--name", "new", "--class", "circle"], "does not exist"),
        ("train-file-not-folder", lambda w: ["train", w.pack, "--name", "new", "--class", "circle"], "is not a folder"),
        ("train-fifo-folder", lambda w: ["train", fifo(w), "--name", "new", "--class", "circle"], "is not a folder"),
        ("train-dev-null", lambda w: ["train", "/dev/null", "--name", "new", "--class", "circle"], "is not a folder"),
        ("train-empty-folder", lambda w: ["train", folder_with(w, {}), "--name", "new", "--class", "circle"], "is empty"),
        ("train-garbage-images", lambda w: ["train", folder_with(w, {"a.txt": b"hello", "b.bin": os.urandom(64)}), "--name", "new", "--class", "circle"], "no readable image"),
        ("train-empty-files", lambda w: ["train", folder_with(w, {"a.dat": b"", "b.dat": b""}), "--name", "new", "--class", "circle"], "no readable image"),
        ("train-model-missing", lambda w: ["train", w.refs, "--name", "new", "--class", "circle", "--model", w.tmp / "nomodel"], "not a diffusers directory"),
        ("train-model-file", lambda w: ["train", w.refs, "--name", "new", "--class", "circle", "--model", w.pack], "not a checkpoint of " + families.described()),
        ("train-missing-argument", lambda w: ["train", "--name", "new", "--class", "circle"], "Missing argument"),
        ("train-unknown-option", lambda w: ["train", w.refs, "--name", "new", "--class", "circle", "--bogus"], "No such option"),
    ]
    # paths: import
    out += [
        ("import-missing", lambda w: ["import", w.tmp / "nope.safetensors"], "does not exist"),
        ("import-folder", lambda w: ["import", w.tmp], "is a folder"),
        ("import-fifo", lambda w: ["import", fifo(w, "p.safetensors")], "not a regular file"),
        ("import-dev-zero", lambda w: ["import", "/dev/zero"], "not a regular file"),
        ("import-dev-null", lambda w: ["import", "/dev/null"], "not a regular file"),
        ("import-empty-file", lambda w: ["import", folder_with(w, {"e.safetensors": b""}) / "e.safetensors"], "not a readable pack"),
        ("import-text", lambda w: ["import", folder_with(w, {"t.safetensors": b"hello world"}) / "t.safetensors"], "not a readable pack"),
        ("import-random", lambda w: ["import", folder_with(w, {"r.safetensors": os.urandom(2048)}) / "r.safetensors"], "not a readable pack"),
        ("import-no-metadata", lambda w: ["import", _plain_safetensors(w)], "not a persres pack"),
        ("import-future-format", lambda w: ["import", write_pack_with(w, "v9", version="9")], "pack format"),
        ("import-v2-without-hash", lambda w: ["import", write_pack_with(w, "nohash", hashed=False)], "content hash"),
        ("import-config-not-json", lambda w: ["import", _raw_meta(w, "{not json")], "malformed"),
        ("import-config-list", lambda w: ["import", _raw_meta(w, "[1, 2]")], "malformed"),
        ("import-config-null", lambda w: ["import", _raw_meta(w, "null")], "malformed"),
        ("import-hash-wrong", lambda w: ["import", _raw_meta(w, None, content="0" * 64)], "content hash"),
    ]
    for cut in (0.05, 0.3, 0.6, 0.95, 0.999):
        out.append((f"import-truncated-{cut}", lambda w, c=cut: ["import", _truncated(w, c)], "not a readable pack"))
    for pos in (-0.02, -0.1, -0.3, -0.5, -0.7, -0.9, -0.99, 0.0, 0.25, 0.5, 0.75, 0.999):
        for bit in (0, 7):
            out.append((f"import-flip-{pos}-{bit}", lambda w, p=pos, b=bit: ["import", flipped(w, p, b), "--name", "flip"], "flip-"))  # names the file
    for key, change in META_CHANGES.items():
        out.append((f"import-meta-{key}", lambda w, k=key, c=change: ["import", write_pack_with(w, k, c), "--name", "bad"], META_FIELD[key]))
    for key, change in TENSOR_CHANGES.items():
        out.append((f"import-tensor-{key}", lambda w, k=key, c=change: ["import", write_pack_with(w, k, tensor_change=c), "--name", "bad"],
                    TENSOR_PROBLEM[key]))
    out += [
        ("import-lora-rank-0", lambda w: ["import", _kohya_changed(w, "rank0", rank0=True), "--name", "r0", "--class", "circle"], "rank 0"),
        ("import-lora-empty-alpha", lambda w: ["import", _kohya_changed(w, "noalpha", alpha=torch.tensor([])), "--name", "ea",
                                               "--class", "circle"], "alpha must be one number"),
        ("import-lora-alpha-2x2", lambda w: ["import", _kohya_changed(w, "alpha22", alpha=torch.ones(2, 2)), "--name", "a22",
                                             "--class", "circle"], "alpha must be one number"),
        ("import-lora-int8", lambda w: ["import", _kohya_changed(w, "int8", dtype=torch.int8), "--name", "i8", "--class", "circle"],
         "not floating point"),
        ("import-lora-dora", lambda w: ["import", _kohya_changed(w, "dora", extra="dora_scale"), "--name", "do", "--class", "circle"],
         "a DoRA file"),
        ("import-lora-locon-mid", lambda w: ["import", _kohya_changed(w, "mid", extra="lora_mid.weight"), "--name", "mid",
                                             "--class", "circle"], "lora_mid"),
        ("import-lora-loha", lambda w: ["import", _kohya_changed(w, "loha", rename=("lora_down", "hada_w1_a")), "--name", "lh",
                                        "--class", "circle"], "a LoHa"),
        ("import-lora-lokr", lambda w: ["import", _kohya_changed(w, "lokr", rename=("lora_down", "lokr_w1")), "--name", "lk",
                                        "--class", "circle"], "a LoKr"),
        ("import-lora-mixed", lambda w: ["import", _kohya_changed(w, "mixed", extra="proj_out.lora_A.weight"), "--name", "mx",
                                         "--class", "circle"], "mixes kohya"),
        ("import-plain-safetensors-with-name", lambda w: ["import", _plain_safetensors(w), "--name", "pl", "--class", "circle"],
         "holds no LoRA weights"),
        ("import-lora-alpha-text", lambda w: ["import", _peft_lora(w, {"lora_alpha": "strong"}), "--name", "al", "--class", "circle"],
         "lora_alpha for"),
        ("import-lora-alpha-pattern-text", lambda w: ["import", _peft_lora(w, {"alpha_pattern": {"proj_out": "x"}}), "--name", "ap",
                                                      "--class", "circle"], "alpha_pattern for"),
    ]
    # paths: export and gen outputs
    out += [
        ("export-into-packs", lambda w: ["export", "one", "-o", w.home / "packs" / "two.safetensors"], "inside the registry"),
        ("export-onto-db", lambda w: ["export", "one", "-o", w.home / "registry.db"], "inside the registry"),
        ("export-into-packs-new", lambda w: ["export", "one", "-o", w.home / "packs" / "new.safetensors"], "inside the registry"),
        ("export-folder", lambda w: ["export", "one", "-o", w.tmp], "is a folder"),
        ("export-existing", lambda w: ["export", "one", "-o", w.pack], "exists"),
        ("export-existing-kohya", lambda w: ["export", "one", "-o", w.pack, "--format", "kohya"], "exists"),
        ("export-unwritable", lambda w: ["export", "one", "-o", "/proc/nope/x.safetensors"], "/proc/nope"),
        ("export-bad-format", lambda w: ["export", "one", "-o", w.tmp / "x.safetensors", "--format", "bogus"], "format"),
        ("export-unknown", lambda w: ["export", "nobody", "-o", w.tmp / "x.safetensors"], "unknown concept"),
        ("gen-out-is-file", lambda w: ["gen", "a V* circle", "-c", "one", "--out", w.pack], "is a file"),
        ("gen-out-unwritable", lambda w: ["gen", "a V* circle", "-c", "one", "--out", "/proc/nope"], "cannot write"),
        ("gen-unknown-concept", lambda w: ["gen", "a V* circle", "-c", "nobody", "--out", w.tmp / "o"], "unknown concept"),
        ("gen-unknown-name", lambda w: ["gen", "a <nobody> circle", "--out", w.tmp / "o"], "unknown concept"),
        ("gen-v2-unbound", lambda w: ["gen", "a V2 circle", "-c", "one", "--out", w.tmp / "o"], "V2 is not bound"),
        ("gen-vstar-two", lambda w: ["gen", "a V* circle", "-c", "one", "-c", "two", "--out", w.tmp / "o"], "V* needs"),
        ("gen-unused", lambda w: ["gen", "a circle", "-c", "one", "--out", w.tmp / "o"], "not in the prompt"),
        ("gen-cut-off", lambda w: ["gen", "red " * 40 + "V* circle", "-c", "one", "--out", w.tmp / "o"], "cut off"),
        ("gen-masks-without-lag", lambda w: ["gen", "a V* circle", "-c", "one", "--save-masks", "--out", w.tmp / "o"], "--lag"),
        ("gen-xformers-on-cpu", lambda w: ["gen", "a V* circle", "-c", "one", "--backend", "xformers", "--steps", "1", "--out", w.tmp / "o"], "xformers"),
        ("gen-device-cuda", lambda w: ["gen", "a V* circle", "-c", "one", "--device", "cuda", "--out", w.tmp / "o"], "cuda"),
        ("gen-model-missing", lambda w: ["gen", "a circle", "--model", w.tmp / "nomodel", "--out", w.tmp / "o"], "not a diffusers directory"),
        ("config-model-missing", lambda w: ["config", "model", w.tmp / "nowhere"], "not a diffusers directory"),
        ("config-model-file", lambda w: ["config", "model", w.pack], "not a checkpoint of " + families.described()),
        ("config-model-folder", lambda w: ["config", "model", w.tmp], "model_index.json"),
        ("config-model-bad-id", lambda w: ["config", "model", "not a hub id"], "hub id"),
        ("config-model-empty", lambda w: ["config", "model", ""], "empty"),
        ("bench-toy-unknown-concept", lambda w: ["bench", "toy", "--concept", "nope"], "unknown toy concept"),
        ("bench-toy-unknown-set", lambda w: ["bench", "toy", "--set", "nope"], "unknown concept set"),
        ("unknown-command", lambda w: ["bogus"], "No such command"),
        ("show-missing-arg", lambda w: ["show"], "Missing argument"),
    ]
    if torch.cuda.is_available():
        out = [c for c in out if c[0] not in ("gen-xformers-on-cpu", "gen-device-cuda", "gen--precision=fp16", "train--precision=fp16")]
    return out


def _lora_of_one(w: World, fmt: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from persres.interop import write_lora
    from persres.packs import read_pack

    tensors, meta = read_pack(w.pack)
    path = write_lora(w.tmp / f"one-{fmt}.safetensors", fmt, tensors, meta)
    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), dict(f.metadata() or {})


def _kohya_changed(w: World, tag: str, *, rank0=False, alpha=None, dtype=None, extra: str | None = None,
                   rename: tuple[str, str] | None = None) -> Path:
    """The pack's kohya export with one thing changed in every module (or one extra key)."""
    tensors, metadata = _lora_of_one(w, "kohya")
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        module = key.removesuffix(".lora_down.weight")
        if rank0:
            tensors[key] = tensors[key][:0]
            tensors[f"{module}.lora_up.weight"] = tensors[f"{module}.lora_up.weight"][:, :0]
        if alpha is not None:
            tensors[f"{module}.alpha"] = alpha.clone()
        if dtype is not None:
            tensors[key] = tensors[key].to(dtype)
        if rename is not None:
            tensors[key.replace(*rename)] = tensors.pop(key)
    if extra is not None:
        first = next(k for k in tensors if k.endswith("lora_up.weight")).removesuffix(".lora_up.weight")
        tensors[f"{first}.{extra}"] = torch.ones(1)
    path = w.tmp / f"kohya-{tag}.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if not k.startswith("persres.")})
    return path


def _peft_lora(w: World, change: dict) -> Path:
    """A diffusers/peft LoRA whose adapter metadata carries `change`."""
    tensors, metadata = _lora_of_one(w, "diffusers")
    config = json.loads(metadata["lora_adapter_metadata"]) | change
    path = w.tmp / f"peft-{'-'.join(change)}.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    return path


def _plain_safetensors(w: World) -> Path:
    path = w.tmp / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    return path


def _raw_meta(w: World, config_text: str | None, content: str | None = None) -> Path:
    tensors, meta = pack_parts(w)
    text = json.dumps(meta, sort_keys=True) if config_text is None else config_text
    path = w.tmp / "raw.safetensors"
    save_file(tensors, str(path), metadata={VERSION_KEY: "2", CONFIG_KEY: text,
                                             CONTENT_KEY: content or content_sha256(tensors, text)})
    return path


def _truncated(w: World, fraction: float) -> Path:
    data = w.pack.read_bytes()
    path = w.tmp / f"cut-{fraction}.safetensors"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


REGISTRY_STATES = ["garbage", "truncated", "newer", "columns", "folder"]
CASES = cases()


def assert_refused(world: World, args, expected: str):
    before = snapshot(world.home)
    result = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "internal error" not in lines[0], lines[0]  # every refusal is a designed message, never the catch-all
    assert "Traceback" not in result.stdout + result.stderr
    assert snapshot(world.home) == before
    return lines[0]


@pytest.mark.parametrize("case_id,make_args,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line(world, case_id, make_args, expected):
    assert_refused(world, make_args(world), expected)


@pytest.mark.parametrize("state", REGISTRY_STATES)
@pytest.mark.parametrize("command", [["list"], ["show", "one"], ["train", "REFS", "--name", "new", "--class", "circle"]])
def test_a_broken_registry_gives_one_line_naming_it(world, state, command):
    damage_db(world, state)
    args = [str(world.refs) if a == "REFS" else a for a in command]
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: registry"), result.stderr
    assert "Traceback" not in result.stderr
    if state == "newer":
        assert "newer than this persres" in lines[0]


@pytest.mark.parametrize("home_kind", ["file", "file-parent", "db-folder"])
def test_a_bad_home_gives_one_line(tmp_path, monkeypatch, home_kind):
    if home_kind == "file":
        (tmp_path / "h").write_text("x")
        monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "h"))
    elif home_kind == "file-parent":
        (tmp_path / "f").write_text("x")
        monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "f" / "h"))
    else:
        (tmp_path / "h" / "registry.db").mkdir(parents=True)
        monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "h"))
    result = runner.invoke(app, ["list"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_list_reports_a_damaged_row_and_keeps_working(world):
    con = sqlite3.connect(world.home / "registry.db")
    con.execute("UPDATE concepts SET loss_start = 'high', ranks = '[1, 2]' WHERE name = 'two'")
    con.commit()
    con.close()
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "damaged" in result.stdout and "one" in result.stdout, result.output
    assert runner.invoke(app, ["rm", "two"]).exit_code == 0
    assert "damaged" not in runner.invoke(app, ["list"]).stdout


def test_every_single_bit_flip_of_a_pack_is_refused(world):
    """Every bit of the header and a stride of the tensor bytes."""
    from persres.errors import PackError
    from persres.packs import read_pack

    data = world.pack.read_bytes()
    header = int.from_bytes(data[:8], "little")
    positions = list(range(0, 8 + header)) + list(range(8 + header, len(data), 7))
    path = world.tmp / "flip.safetensors"
    accepted = []
    for i in positions:
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            path.write_bytes(bytes(mutated))
            try:
                read_pack(path)
            except PackError:
                continue
            accepted.append((i, bit))
    assert accepted == []
