import pytest
import torch

from persres import residuals
from persres.api import apply_concepts, train_concept
from persres.config import SampleConfig, TrainConfig
from persres.errors import IncompatiblePack, ModelNotFound
from persres.interop import write_lora as write_foreign
from persres.models import fingerprint, load_pipeline, model_defaults
from persres.registry import Registry
from persres.sample import OtherCheckpointWarning, generate


def test_missing_local_model_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelNotFound, match="neither a diffusers directory nor a .safetensors"):
        load_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFound, match="could not be fetched"):
        load_pipeline("CompVis/stable-diffusion-v1-4-not-here")


def test_fingerprint_separates_architecture_from_checkpoint(tiny_model, tiny_other_checkpoint, tiny_linear_model):
    a = fingerprint(load_pipeline(str(tiny_model)).unet)
    b = fingerprint(load_pipeline(str(tiny_other_checkpoint)).unet)
    c = fingerprint(load_pipeline(str(tiny_linear_model)).unet)
    assert a.architecture == b.architecture and a.weights != b.weights
    assert a.architecture != c.architecture
    assert a == fingerprint(load_pipeline(str(tiny_model)).unet)


@pytest.fixture
def trained_pack(tiny_model, concept_dir):
    return train_concept(concept_dir, "mydog", "circle", model=str(tiny_model), config=TrainConfig(steps=3, lr=1e-2, init="random"))


def test_pack_of_another_architecture_is_refused(trained_pack, tiny_linear_model):
    pipe = load_pipeline(str(tiny_linear_model))
    with pytest.raises(IncompatiblePack, match="does not fit"):
        apply_concepts(pipe, ["mydog"], model=str(tiny_linear_model))
    assert not residuals.loaded_concepts(pipe.unet)


def test_pack_of_another_checkpoint_loads_with_a_warning(trained_pack, tiny_other_checkpoint):
    pipe = load_pipeline(str(tiny_other_checkpoint))
    with pytest.warns(OtherCheckpointWarning, match="another checkpoint"):
        apply_concepts(pipe, ["mydog"])
    assert residuals.loaded_concepts(pipe.unet) == ["mydog"]


def test_apply_to_a_pipeline_you_already_hold(trained_pack, pipe):
    base = generate(pipe, "a sks circle", [], SampleConfig(steps=2)).images[0]
    concepts = apply_concepts(pipe, ["mydog"])
    personal = generate(pipe, "a sks circle", concepts, SampleConfig(steps=2)).images[0]
    assert list(base.getdata()) != list(personal.getdata())
    residuals.remove(pipe.unet)
    again = generate(pipe, "a sks circle", [], SampleConfig(steps=2)).images[0]
    assert list(base.getdata()) == list(again.getdata())


def test_model_defaults_file(tmp_path, tiny_model):
    from persres.api import train_config_for

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
    apply_concepts(ours, ["mydog"])
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

    outcome = train_concept(concept_dir, "b16", "circle", model=str(tiny_model),
                            config=TrainConfig(steps=3, precision="bf16", device="cpu"))
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
        models._warn_emulated_bf16.cache_clear()
        monkeypatch.setattr(models, "cpu_native_bf16", lambda native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # a command asks more than once
                assert models.pick_dtype("bf16", torch.device("cpu")) is torch.bfloat16
        slow = [w for w in caught if issubclass(w.category, models.SlowPrecisionWarning)]
        assert len(slow) == expected, native
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):  # auto: bf16 only where native
        monkeypatch.setattr(models, "cpu_native_bf16", lambda native=native: native)
        assert models.pick_dtype("auto", torch.device("cpu")) is expected
    from persres.errors import InputError

    with pytest.raises(InputError, match="fp16 needs CUDA"):
        models.pick_dtype("fp16", torch.device("cpu"))

