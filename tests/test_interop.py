"""LoRA interop both ways: exports that diffusers loads at scale 1 per module (mixed ranks),
metadata UIs show, and foreign proj_out LoRAs imported as concepts with exact round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from persres import residuals
from persres.workspace import Workspace
from persres.config import SampleConfig, TrainConfig
from persres.errors import PackError
from persres.interop import write_lora
from persres.models import load_pipeline
from persres.registry import Registry
from persres.sample import generate

FLOOR_DIR = Path(__file__).resolve().parents[1] / ".ci-cache" / "diffusers-floor"  # .ci/run installs the floor release here


@pytest.fixture
def pack(tiny_model, concept_dir):
    Workspace(str(tiny_model)).train(concept_dir, "mine", "circle", config=TrainConfig(steps=3, lr=1e-2, init="random"))
    return Registry().load("mine")


def expected_weights(pipe, tensors, meta) -> dict[str, torch.Tensor]:
    """W + A B per block, from the base pipeline's own proj_out weights."""
    out = {}
    for block in meta.ranks:
        w = residuals.transformer_blocks(pipe.unet)[block].proj_out.weight.detach().flatten(1)
        out[block] = w + tensors[f"{block}.up"] @ tensors[f"{block}.down"]
    return out


def fused_weights(pipe, blocks) -> dict[str, torch.Tensor]:
    named = dict(pipe.unet.named_modules())
    out = {}
    for block in blocks:
        layer = named[f"{block}.proj_out"]
        layer = getattr(layer, "base_layer", layer)
        out[block] = layer.weight.detach().flatten(1)
    return out


def test_the_tiny_model_has_mixed_ranks(pack):
    _, meta = pack
    assert len(set(meta.ranks.values())) > 1  # otherwise the scale checks below prove nothing


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_every_module_loads_at_scale_one_in_the_installed_diffusers(fmt, pack, tiny_model, tmp_path):
    pytest.importorskip("peft")
    tensors, meta = pack
    path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, tensors, meta)
    pipe = load_pipeline(str(tiny_model))
    expected = expected_weights(pipe, tensors, meta)
    pipe.load_lora_weights(str(path), adapter_name="mine")
    pipe.fuse_lora()
    got = fused_weights(pipe, meta.ranks)
    for block in meta.ranks:
        torch.testing.assert_close(got[block], expected[block], rtol=0, atol=1e-6, msg=block)


def test_diffusers_export_pads_to_one_rank_and_declares_it(pack, tmp_path):
    tensors, meta = pack
    path = write_lora(tmp_path / "d.safetensors", "diffusers", tensors, meta)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if ".lora_A." in k}
    top = max(meta.ranks.values())
    assert ranks == {top}
    adapter = json.loads(md["lora_adapter_metadata"])
    assert adapter["unet.r"] == adapter["unet.lora_alpha"] == top


@pytest.mark.skipif(not FLOOR_DIR.is_dir(), reason="the floor diffusers is installed by .ci/run")
def test_the_lowest_allowed_diffusers_loads_the_export_at_scale_one(pack, tiny_model, tmp_path):
    """Runs the oldest diffusers pyproject.toml allows, in a subprocess, on our diffusers export."""
    tensors, meta = pack
    path = write_lora(tmp_path / "d.safetensors", "diffusers", tensors, meta)
    expected = expected_weights(load_pipeline(str(tiny_model)), tensors, meta)
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch, diffusers
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(tiny_model)!r}, safety_checker=None, requires_safety_checker=False)
pipe.load_lora_weights({str(path.parent)!r}, weight_name={path.name!r}, adapter_name="mine")
pipe.fuse_lora()
expected = torch.load({str(tmp_path / 'expected.pt')!r})
named = dict(pipe.unet.named_modules())
worst = 0.0
for block, w in expected.items():
    layer = named[block + ".proj_out"]
    layer = getattr(layer, "base_layer", layer)
    worst = max(worst, (layer.weight.detach().flatten(1) - w).abs().max().item())
print(diffusers.__version__, worst)
"""
    env = {**os.environ, "PYTHONPATH": str(FLOOR_DIR)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    version, worst = result.stdout.split()[-2:]
    from importlib.metadata import requires

    floor = next(r for r in requires("persres") if r.startswith("diffusers"))
    assert version == floor.split(">=")[1].split(",")[0].strip(), (version, floor)
    assert float(worst) < 1e-6


def test_export_metadata_for_uis(pack, tmp_path):
    tensors, meta = pack
    for fmt in ("kohya", "diffusers"):
        with safe_open(str(write_lora(tmp_path / f"{fmt}.safetensors", fmt, tensors, meta)), framework="pt") as f:
            md = f.metadata()
        trigger = f"{meta.identifier} circle"
        assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert md["modelspec.trigger_phrase"] == trigger and md["modelspec.implementation"] == "diffusers"
        assert json.loads(md["ss_tag_frequency"]) == {"mine": {trigger: 4}}
        assert md["ss_num_train_images"] == "4" and md["ss_steps"] == "3" and md["ss_network_module"] == "networks.lora"
        assert md["modelspec.sai_model_spec"] and md["modelspec.title"] == "mine" and md["modelspec.date"]
        assert md["modelspec.resolution"] == "16x16" and md["ss_resolution"] == "(16, 16)"


def test_linear_packs_say_sd_v2(tiny_linear_model, concept_dir, tmp_path):
    Workspace(str(tiny_linear_model)).train(concept_dir, "lin", "circle", config=TrainConfig(steps=1))
    tensors, meta = Registry().load("lin")
    with safe_open(str(write_lora(tmp_path / "k.safetensors", "kohya", tensors, meta)), framework="pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2" and md["modelspec.architecture"].startswith("stable-diffusion-v2")


def pixels(pipe, concept):
    return list(generate(pipe, f"a {concept.identifier} circle", [concept], SampleConfig(steps=3, seed=5)).images[0].getdata())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_then_import_gives_the_same_pixels(fmt, pack, tiny_model, tmp_path):
    tensors, meta = pack
    path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, tensors, meta)
    record = Workspace(str(tiny_model)).import_concept(path, "back")  # class and identifier from the file's metadata
    assert record.meta.identifier == meta.identifier and record.meta.class_word == "circle"
    back, _ = Registry().load("back")
    for key in tensors:
        assert torch.equal(back[key], tensors[key]), key
    pipe = load_pipeline(str(tiny_model))
    original, again = Workspace(pipe=pipe).apply_concepts(["mine", "back"])
    assert pixels(pipe, original) == pixels(pipe, again)


def peft_lora_file(tiny_model, tmp_path, alpha_factor=2, targets=("proj_out",)) -> tuple[Path, object]:
    """A LoRA written by diffusers' own save_lora_weights from a peft adapter (lora_alpha = 2 r)."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline(str(tiny_model))
    config = LoraConfig(r=2, lora_alpha=2 * alpha_factor, target_modules=list(targets), init_lora_weights=False)
    pipe.unet.add_adapter(config)
    state = get_peft_model_state_dict(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "peft", unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    return tmp_path / "peft" / "pytorch_lora_weights.safetensors", pipe


def test_a_peft_lora_imports_with_its_alpha_folded_in(tiny_model, tmp_path):
    path, with_adapter = peft_lora_file(tiny_model, tmp_path)
    record = Workspace(str(tiny_model)).import_concept(path, "peft", "circle")
    assert set(record.meta.ranks.values()) == {2}
    g = torch.Generator().manual_seed(0)
    sample, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 32, 32, generator=g)
    with torch.no_grad():
        expected = with_adapter.unet(sample, 10, encoder_hidden_states=emb).sample
    ours = load_pipeline(str(tiny_model))
    Workspace(pipe=ours).apply_concepts(["peft"])
    with torch.no_grad(), residuals.use_concepts(ours.unet, ["peft"], merged=True):
        got = ours.unet(sample, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_lora_with_other_targets_keeps_them_unless_told_to_drop_them(tiny_model, tmp_path):
    path, _ = peft_lora_file(tiny_model, tmp_path, targets=("proj_out", "to_q"))
    whole = Workspace(str(tiny_model)).import_concept(path, "whole", "circle")
    assert any(k.endswith(".to_q") for k in whole.meta.layers) and any(k.endswith(".proj_out") for k in whole.meta.layers)
    with pytest.warns(UserWarning, match="dropped"):
        record = Workspace(str(tiny_model)).import_concept(path, "both", "circle", proj_out_only=True)
    assert record.name == "both" and not record.meta.layers and record.meta.ranks


def kohya_file(tmp_path, pack, change) -> Path:
    tensors, meta = pack
    path = write_lora(tmp_path / "k.safetensors", "kohya", tensors, meta)
    data = load_file(str(path))
    change(data)
    out = tmp_path / "bad.safetensors"
    save_file(data, str(out))
    return out


def _first(data, suffix):
    return next(k for k in sorted(data) if k.endswith(suffix))


BAD_LORAS = {
    "other-architecture": (lambda d: [d.__setitem__(k.replace("lora_unet_down_blocks_0", "lora_unet_down_blocks_9"), d.pop(k))
                                      for k in list(d)], "does not have (e.g. lora_unet_down_blocks_9"),
    "no-such-layer": (lambda d: [d.__setitem__(k.replace("proj_out", "attn1_to_q"), d.pop(k)) for k in list(d)], "does not have"),
    "mismatched-shapes": (lambda d: d.__setitem__(_first(d, "lora_up.weight"), torch.zeros(5, 1, 1, 1)), "do not fit"),
    "nan": (lambda d: d.__setitem__(_first(d, "lora_down.weight"), torch.full_like(d[_first(d, "lora_down.weight")], float("nan"))), "non-finite"),
    "alpha-zero": (lambda d: d.__setitem__(_first(d, ".alpha"), torch.tensor(0.0)), "alpha"),
    "missing-factor": (lambda d: d.pop(_first(d, "lora_up.weight")), "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_LORAS))
def test_bad_foreign_loras_are_refused_in_one_line(case, pack, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from persres.cli import app

    change, expected = BAD_LORAS[case]
    path = kohya_file(tmp_path, pack, change)
    before = Registry().names()
    result = CliRunner().invoke(app, ["import", str(path), "--name", "x", "--class", "circle", "--model", str(tiny_model)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.stderr
    assert Registry().names() == before


def test_the_shipped_toy_model_loads_in_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    from persres.models import TOY_DIR

    pipe = StableDiffusionPipeline.from_pretrained(TOY_DIR)  # default arguments, as a diffusers user would
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (32, 32)


def test_import_identifier_names_a_foreign_lora_and_is_refused_for_a_persres_pack(pack, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from persres.cli import app

    tensors, meta = pack
    path = write_lora(tmp_path / "kohya.safetensors", "kohya", tensors, meta)
    env = {"PERSRES_MODEL": str(tiny_model)}
    given = CliRunner().invoke(app, ["import", str(path), "--name", "renamed", "--identifier", "zwx"], env=env)
    assert given.exit_code == 0, given.output
    record = Registry().get("renamed")
    assert record.meta.identifier == "zwx" != meta.identifier
    # a persres pack keeps its own identifier and class word: the options are refused, nothing registered
    exported = tmp_path / "mine.safetensors"
    Registry().export_pack("mine", exported)
    for option, value in (("--identifier", "qrv"), ("--class", "dog")):
        refused = CliRunner().invoke(app, ["import", str(exported), "--name", "again", option, value], env=env)
        assert refused.exit_code == 1 and f"drop {option}" in refused.stderr, refused.output
    assert not Registry().has("again")


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_linear_model", "tiny_xl_model", "tiny_flux"])
def test_every_family_re_imports_its_own_exports_in_every_format(fixture, request, concept_dir, tmp_path):
    """Full-rank blocks of several widths: the diffusers export pads every block to the largest rank,
    above the narrow blocks' width; each format's file re-imports to the same ΔW on every block."""
    from persres.interop import FORMATS

    ws = Workspace(str(request.getfixturevalue(fixture)))
    ws.train(concept_dir, "mine", "circle", steps=1, rank=64, init="random", resolution=32)
    tensors, meta = ws.registry.load("mine")
    if fixture in ("tiny_model", "tiny_linear_model"):  # blocks of several widths: padding above the narrow ones
        assert len(set(meta.ranks.values())) > 1
    for fmt in FORMATS:
        path = ws.export("mine", tmp_path / f"{fmt}.safetensors", fmt)
        ws.import_concept(path, f"back-{fmt}")
        back, back_meta = ws.registry.load(f"back-{fmt}")
        assert back_meta.ranks == meta.ranks, fmt
        for block in meta.ranks:
            up, down = f"{block}.up", f"{block}.down"
            assert torch.equal(back[up] @ back[down], tensors[up] @ tensors[down]), (fmt, block)


def test_a_lora_of_rank_above_the_layer_width_imports_to_the_same_delta(pack, tiny_model, tmp_path):
    tensors, meta = pack
    file = load_file(str(write_lora(tmp_path / "k.safetensors", "kohya", tensors, meta)))
    g = torch.Generator().manual_seed(0)
    expected = {}
    for key in [k for k in file if k.endswith("lora_down.weight")]:
        module = key.removesuffix(".lora_down.weight")
        m, n = file[f"{module}.lora_up.weight"].shape[0], file[key].shape[1]
        up, down = torch.randn(m, m + 3, 1, 1, generator=g), torch.randn(m + 3, n, 1, 1, generator=g)  # rank m + 3 > m
        file[f"{module}.lora_up.weight"], file[key], file[f"{module}.alpha"] = up, down, torch.tensor(float(m + 3))
        expected[module] = up.flatten(1) @ down.flatten(1)
    path = tmp_path / "wide.safetensors"
    save_file(file, str(path))
    Workspace(str(tiny_model)).import_concept(path, "wide", "circle")
    back, back_meta = Registry().load("wide")
    from persres import families
    from persres.interop.kohya import PREFIX  # noqa: F401  (the names below are kohya's)

    family = families.of_meta(back_meta)
    for block, r in back_meta.ranks.items():
        assert r == back_meta.channels[block]  # stored at the layer's width
        delta = back[f"{block}.up"] @ back[f"{block}.down"]
        assert torch.equal(delta, expected[family.kohya_key(block, back_meta.ranks)]), block
