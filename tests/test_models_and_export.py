import pytest
import torch

from persres import residuals
from persres.workspace import Workspace
from persres.config import SampleConfig, TrainConfig
from persres.errors import IncompatiblePack, ModelNotFound
from persres.interop import write_lora as write_foreign
from persres.models import fingerprint, load_pipeline
from persres.settings import model_defaults
from persres.registry import Registry
from persres.fitting import OtherCheckpointWarning
from persres.sample import generate
from persres.workspace import Workspace


def test_missing_local_model_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelNotFound, match="neither a diffusers directory nor a .safetensors"):
        load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFound, match="could not be fetched"):
        load_pipeline("CompVis/stable-diffusion-v1-4-not-here")
    with pytest.raises(ModelNotFound, match="could not be fetched: HF_HUB_OFFLINE is set"):
        Workspace("CompVis/stable-diffusion-v1-4-not-here").pipeline()


def test_a_hub_id_with_the_hub_unreachable_fails_at_once(monkeypatch):
    """No retries: the connection is probed first and its failure is the one line."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelNotFound, match=rf"127.0.0.1:{port} cannot be reached \(Connection refused\)"):
        Workspace("nobody/not-cached").pipeline()


def test_fingerprint_separates_architecture_from_checkpoint(tiny_model, tiny_other_checkpoint, tiny_linear_model):
    a = fingerprint(load_pipeline(str(tiny_model)).unet)
    b = fingerprint(load_pipeline(str(tiny_other_checkpoint)).unet)
    c = fingerprint(load_pipeline(str(tiny_linear_model)).unet)
    assert a.architecture == b.architecture and a.weights != b.weights
    assert a.architecture != c.architecture
    assert a == fingerprint(load_pipeline(str(tiny_model)).unet)


def test_a_model_loaded_in_bf16_has_the_fingerprint_of_its_weights_on_disk(tiny_model, concept_dir):
    """bf16 rounds the weights coarser than the fingerprint's fp16: without care a pack trained in
    bf16 (the default on a GPU, and on CPUs with native bf16) would name other weights than the
    model's files, and train-many would fail every finished row instead of skipping it."""
    from persres.models import base_weights

    fp32, bf16 = (load_pipeline(str(tiny_model), dtype=d) for d in (torch.float32, torch.bfloat16))
    assert bf16.unet.dtype == torch.bfloat16
    assert fingerprint(bf16.unet) == fingerprint(fp32.unet)
    assert fingerprint(bf16.unet).weights == base_weights(str(tiny_model))
    outcome = Workspace(str(tiny_model)).train(concept_dir, "bf", "circle", config=TrainConfig(steps=1, precision="bf16"))
    assert outcome.record.meta.weights == base_weights(str(tiny_model))


@pytest.fixture
def trained_pack(tiny_model, concept_dir):
    return Workspace(str(tiny_model)).train(concept_dir, "mydog", "circle", config=TrainConfig(steps=3, lr=1e-2, init="random"))


def test_pack_of_another_architecture_is_refused(trained_pack, tiny_linear_model):
    pipe = load_pipeline(str(tiny_linear_model))
    with pytest.raises(IncompatiblePack, match="does not fit"):
        Workspace(str(tiny_linear_model), pipe=pipe).apply_concepts(["mydog"])
    assert not residuals.loaded_concepts(pipe.unet)


def test_pack_of_another_checkpoint_loads_with_a_warning(trained_pack, tiny_other_checkpoint):
    pipe = load_pipeline(str(tiny_other_checkpoint))
    with pytest.warns(OtherCheckpointWarning, match="another checkpoint"):
        Workspace(pipe=pipe).apply_concepts(["mydog"])
    assert residuals.loaded_concepts(pipe.unet) == ["mydog"]


def test_apply_to_a_pipeline_you_already_hold(trained_pack, pipe):
    base = generate(pipe, "a sks circle", [], SampleConfig(steps=2)).images[0]
    concepts = Workspace(pipe=pipe).apply_concepts(["mydog"])
    personal = generate(pipe, "a sks circle", concepts, SampleConfig(steps=2)).images[0]
    assert list(base.getdata()) != list(personal.getdata())
    residuals.remove(pipe.unet)
    again = generate(pipe, "a sks circle", [], SampleConfig(steps=2)).images[0]
    assert list(base.getdata()) == list(again.getdata())


def test_model_defaults_file(tmp_path, tiny_model):
    from persres.settings import train_config_for

    assert model_defaults(str(tiny_model)) == {}
    (tmp_path / "persres_defaults.json").write_text('{"train": {"lr": 0.01, "steps": 400}}')
    config = train_config_for(str(tmp_path), {"steps": 20, "lr": None})
    assert config.lr == 0.01 and config.steps == 20 and config.batch_size == 4


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_lora_loads_in_diffusers_and_matches_the_merged_model(fmt, trained_pack, tiny_model, tmp_path):
    pytest.importorskip("peft")
    tensors, meta = Registry().load("mydog")
    path = write_foreign(tmp_path / f"{fmt}.safetensors", fmt, tensors, meta)

    ours = load_pipeline(str(tiny_model))
    Workspace(pipe=ours).apply_concepts(["mydog"])
    theirs = load_pipeline(str(tiny_model))
    theirs.load_lora_weights(str(path), adapter_name="mydog")

    g = torch.Generator().manual_seed(0)
    sample, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 32, 32, generator=g)
    with torch.no_grad(), residuals.use_concepts(ours.unet, ["mydog"], merged=True):
        expected = ours.unet(sample, 10, encoder_hidden_states=emb).sample
    base = load_pipeline(str(tiny_model)).unet(sample, 10, encoder_hidden_states=emb).sample
    with torch.no_grad():
        got = theirs.unet(sample, 10, encoder_hidden_states=emb).sample
    assert not torch.allclose(expected, base, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_training_on_the_cpu(tiny_model, concept_dir):
    import math

    outcome = Workspace(str(tiny_model)).train(concept_dir, "b16", "circle", config=TrainConfig(steps=3, precision="bf16", device="cpu"))
    assert all(math.isfinite(x) for x in outcome.losses)
    tensors, _ = Registry().load("b16")
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_fp16_on_the_cpu_is_refused():
    from persres.errors import InputError
    from persres.models import pick_dtype

    from persres.errors import InputError

    with pytest.raises(InputError, match="fp16 needs CUDA"):
        pick_dtype("fp16", torch.device("cpu"))


def test_bf16_on_a_cpu_without_native_bf16_warns_once_and_still_runs(monkeypatch):
    import warnings

    from persres import models

    for native, expected in ((True, 0), (False, 1)):
        models.precision._warn_emulated_bf16.cache_clear()
        monkeypatch.setattr(models.precision, "cpu_native_bf16", lambda native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # a command asks more than once
                assert models.pick_dtype("bf16", torch.device("cpu")) is torch.bfloat16
        slow = [w for w in caught if issubclass(w.category, models.SlowPrecisionWarning)]
        assert len(slow) == expected, native
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):  # auto: bf16 only where native
        monkeypatch.setattr(models.precision, "cpu_native_bf16", lambda native=native: native)
        assert models.pick_dtype("auto", torch.device("cpu")) is expected
    from persres.errors import InputError

    with pytest.raises(InputError, match="fp16 needs CUDA"):
        models.pick_dtype("fp16", torch.device("cpu"))



def test_auto_precision_on_a_native_bf16_cpu_weighs_the_unets_size(monkeypatch, tiny_model, tmp_path):
    import json

    from persres import models
    from persres.testing import SD14_UNET_CONFIG

    cpu = torch.device("cpu")
    toy = models.unet_config_of("toy")
    assert toy is not None and toy["block_out_channels"] == json.loads((models.TOY_DIR / "unet" / "config.json").read_text())["block_out_channels"]
    monkeypatch.setattr(models.precision, "cpu_native_bf16", lambda: True)
    dtype, why = models.choose_dtype("auto", cpu, toy)
    assert dtype is torch.float32 and "bf16 is slower than fp32 on this CPU for a UNet this small (width 312 <" in why
    assert models.choose_dtype("auto", cpu, models.unet_config_of(str(tiny_model)))[0] is torch.float32
    assert models.choose_dtype("auto", cpu, SD14_UNET_CONFIG) == (torch.bfloat16, "native on this CPU, and faster than fp32 for a UNet this large")
    assert models.choose_dtype("auto", cpu, None)[0] is torch.bfloat16  # unknown before loading: a Stable Diffusion
    assert models.choose_dtype("bf16", cpu, toy) == (torch.bfloat16, "asked for")  # an explicit choice stands
    monkeypatch.setattr(models.precision, "cpu_native_bf16", lambda: False)
    assert models.choose_dtype("auto", cpu, SD14_UNET_CONFIG) == (torch.float32, "this CPU has no native bf16")
    # configs read without loading: none for a folder without a UNet config, a damaged one, a single file
    (tmp_path / "bare").mkdir()
    (tmp_path / "damaged" / "unet").mkdir(parents=True)
    (tmp_path / "damaged" / "unet" / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert [models.unet_config_of(str(tmp_path / p)) for p in ("bare", "damaged", "model.safetensors")] == [None, None, None]


def test_workspace_loads_the_toy_model_in_the_precision_auto_chose(monkeypatch):
    from persres import models
    from persres.workspace import Workspace

    monkeypatch.setattr(models.precision, "cpu_native_bf16", lambda: True)
    assert Workspace("toy", open_registry=False).pipeline().unet.dtype is torch.float32
    assert Workspace("toy", open_registry=False, precision="bf16").pipeline().unet.dtype is torch.bfloat16


def test_base_weights_reads_the_fingerprint_without_building_the_pipeline(tiny_model, tiny_linear_model, tiny_other_checkpoint,
                                                                         tmp_path, monkeypatch):
    import shutil

    from diffusers import UNet2DConditionModel

    import persres.models as models
    from persres.models import base_weights

    expected = {m: fingerprint(load_pipeline(str(m)).unet).weights for m in (tiny_model, tiny_linear_model, tiny_other_checkpoint)}
    assert expected[tiny_model] != expected[tiny_other_checkpoint]
    monkeypatch.setattr(models.load, "load_pipeline", lambda *a, **k: pytest.fail("read from the file, not loaded"))
    for m, weights in expected.items():
        assert base_weights(str(m)) == weights
    monkeypatch.undo()
    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    for name, options in {"sharded": dict(max_shard_size="20KB"), "bin": dict(safe_serialization=False)}.items():
        copy = shutil.copytree(tiny_model, tmp_path / name, ignore=shutil.ignore_patterns("unet"))
        unet.save_pretrained(copy / "unet", **options)
        assert (copy / "unet" / models.files.INDEX).is_file() == (name == "sharded")
        assert base_weights(str(copy)) == expected[tiny_model], name  # the .bin one by loading the pipeline
    # a hub id: read from the hub cache's snapshot, without building the pipeline
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    shutil.copytree(tiny_other_checkpoint, cache / "models--someone--tiny-sd" / "snapshots" / "abc123")
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(models.load, "load_pipeline", lambda *a, **k: pytest.fail("read from the cache, not loaded"))
    assert base_weights("someone/tiny-sd") == expected[tiny_other_checkpoint]


def replace_weights(path, other) -> None:
    """Save another checkpoint's files over the model at `path` (the path, and so the config digest, stay)."""
    import shutil

    shutil.rmtree(path)
    shutil.copytree(other, path)


def test_train_many_does_not_take_a_pack_of_the_old_weights_at_the_same_path_as_done(tiny_model, tiny_other_checkpoint,
                                                                                    concept_dir, tmp_path):
    import shutil

    from persres.manifest import Row
    from persres.train_many import train_many

    model = shutil.copytree(tiny_model, tmp_path / "model")
    rows = [Row(0, 2, str(concept_dir), "mine", "circle", {"steps": 2})]
    registry = Registry()
    assert [r.status for r in train_many(rows, model=str(model), registry=registry)] == ["trained"]
    assert [r.status for r in train_many(rows, model=str(model), registry=registry)] == ["skipped"]  # same weights: done
    before = registry.get("mine").meta
    replace_weights(model, tiny_other_checkpoint)
    [again] = train_many(rows, model=str(model), registry=registry)
    assert again.status == "failed" and "trained on other weights than those now at" in again.message
    assert registry.get("mine").meta == before  # the registered pack is left as it was
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: one clear failure for the row, no traceback
    [damaged] = train_many(rows, model=str(model), registry=registry)
    assert damaged.status == "failed" and str(model) in damaged.message
    assert registry.get("mine").meta == before


def test_benchmark_packs_are_retrained_when_the_weights_at_the_path_change(tiny_model, tiny_other_checkpoint, tmp_path):
    import shutil

    from persres.settings import config_digest
    from persres.toy.bench import prepare_concepts

    model = str(shutil.copytree(tiny_model, tmp_path / "model"))
    config, registry = TrainConfig(steps=1), Registry()
    first = prepare_concepts(Workspace(model, registry=registry), ["checker_circle"], config)["checker_circle"]
    again = prepare_concepts(Workspace(model, registry=registry), ["checker_circle"], config)["checker_circle"]
    assert again.bound.name == first.bound.name and len(registry.list()) == 1  # reused
    replace_weights(tmp_path / "model", tiny_other_checkpoint)
    ws = Workspace(model, registry=registry)
    fresh = prepare_concepts(ws, ["checker_circle"], config)["checker_circle"]
    pipe = ws.pipeline()
    assert fresh.bound.name != first.bound.name and len(registry.list()) == 2
    assert registry.get(fresh.bound.name).meta.weights == fingerprint(pipe.unet).weights
    # what a pack records is the digest of what was asked (config and path): unchanged, so older registries still match
    assert registry.get(fresh.bound.name).meta.train_config["config_digest"] == config_digest(config, model)


def test_a_setting_added_later_leaves_older_pack_names_alone_at_its_default():
    import hashlib
    import json

    from persres.settings import config_digest

    config = TrainConfig(steps=7)
    before_it_existed = {k: v for k, v in config.to_dict().items() if k not in ("lr_schedule", "snr_gamma")}  # what older persres hashed
    older = hashlib.sha256(json.dumps([before_it_existed, "toy"], sort_keys=True).encode()).hexdigest()[:8]
    assert config_digest(config, "toy") == older  # so a rerun finds the packs it trained before
    assert config_digest(config.replace(lr_schedule="cosine"), "toy") != older
    assert config_digest(config.replace(snr_gamma=5.0), "toy") != older
