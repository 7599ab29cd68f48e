"""SD 1.x, SD 2.x and SDXL: the family is read from the model, residuals fit every family,
training and LAG run on a tiny SDXL exactly as on SD 1.x."""

import json

import pytest
import torch

from persres import residuals
from persres.config import SampleConfig, TrainConfig
from persres import families
from persres.lag import ConceptTokens, lag_regions, median_mask
from persres.testing import SD14_UNET_CONFIG, SD21_UNET_CONFIG, SDXL_UNET_CONFIG, build_tiny_xl_pipeline


@pytest.fixture
def xl_pipe(tiny_xl_model):
    from persres.models import load_pipeline

    return load_pipeline(str(tiny_xl_model))


def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the architecture without weights or memory
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("config,family,blocks,ranks,kind,count", [
    (SD14_UNET_CONFIG, "sd1", 16, [16, 32, 64], torch.nn.Conv2d, 1_239_040),
    (SD21_UNET_CONFIG, "sd2", 16, [16, 32, 64], torch.nn.Linear, 1_239_040),
    (SDXL_UNET_CONFIG, "sdxl", 11, [32, 64], torch.nn.Linear, 1_187_840),
])
def test_residual_parameter_count_per_family(config, family, blocks, ranks, kind, count):
    unet = meta_unet(config)
    assert families.of_config(unet.config).key == family
    r = residuals.ranks_for(unet)
    assert len(r) == blocks and sorted(set(r.values())) == ranks
    assert all(isinstance(residuals.base_layer_of(b.proj_out), kind) for b in residuals.transformer_blocks(unet).values())
    factors = residuals.new_concept(unet, "c", r)
    assert sum(p.numel() for f in factors.values() for p in f.parameters()) == count
    assert residuals.parameter_count(r, residuals.block_channels(unet)) == count


def test_sdxl_blocks_hold_several_layers_and_one_proj_out():
    unet = meta_unet(SDXL_UNET_CONFIG)
    layers = sorted(len(b.transformer_blocks) for b in residuals.transformer_blocks(unet).values())
    assert layers == [2] * 5 + [10] * 6


def test_tiny_models_are_recognized(xl_pipe, pipe, tiny_linear_model):
    from persres.models import load_pipeline

    assert type(xl_pipe).__name__ == "StableDiffusionXLPipeline" and families.of(xl_pipe).key == "sdxl"
    assert families.of(pipe).key == "sd1"
    assert families.of(load_pipeline(str(tiny_linear_model))).key == "sd2"
    assert not any(p.requires_grad for p in xl_pipe.text_encoder_2.parameters())


def test_sdxl_training_conditions_on_the_pooled_embedding_and_size(xl_pipe):
    from persres.train import cache_inputs

    from PIL import Image

    source = cache_inputs(xl_pipe, [Image.new("RGB", (16, 16), (200, 10, 10))], "a photo of a sks circle", 16, flip=False)
    batch = source.sample(3, torch.Generator().manual_seed(0))
    assert batch.embedding.shape == (3, xl_pipe.tokenizer.model_max_length, 64)  # both encoders' 32 dims
    assert batch.added["text_embeds"].shape == (3, 32)
    assert batch.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 3
    # the sampler's own conditioning: what the residual learns is what it meets at sampling time
    embeds, _, pooled, _ = xl_pipe.encode_prompt("a photo of a sks circle", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(batch.embedding[:1], embeds)
    torch.testing.assert_close(batch.added["text_embeds"][:1], pooled)


def test_sdxl_training_lowers_the_loss(xl_pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    result = train_residuals(xl_pipe, images, "sks", "circle", TrainConfig(steps=40, lr=1e-2))
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < first, (first, last)
    assert set(result.ranks) == set(residuals.block_channels(xl_pipe.unet))


def test_sdxl_lag_sums_the_maps_of_every_layer_in_a_block(xl_pipe):
    unet = xl_pipe.unet
    residuals.new_concept(unet, "a", residuals.ranks_for(unet), init="random")
    blocks = residuals.transformer_blocks(unet)
    layers = {name: len(b.transformer_blocks) for name, b in blocks.items()}
    assert set(layers.values()) == {2}
    recorded: dict[str, list[torch.Tensor]] = {}
    regions: dict[str, torch.Tensor] = {}
    with residuals.use_concepts(unet, ["a"], merged=False), lag_regions(unet, [ConceptTokens("a", (2, 3))], guided=False) as session:
        record, region = session.record, session.region
        session.record = lambda block, maps: (recorded.setdefault(block, []).append(maps.clone()), record(block, maps))
        session.region = lambda block, concept, x: regions.setdefault(block, region(block, concept, x))
        emb, _, pooled, _ = xl_pipe.encode_prompt("a sks circle", device="cpu", do_classifier_free_guidance=False)
        unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]), encoder_hidden_states=emb,
             added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])})
    assert {b: len(m) for b, m in recorded.items()} == layers  # every layer's attn2 reports
    last_alone_differs = []
    for block, maps in recorded.items():
        expected = median_mask(sum(maps).float())[:, 0]  # (B, N): the sum over the block's layers, then the median
        assert torch.equal(regions[block].flatten(1).bool(), expected), block
        last_alone_differs.append(not torch.equal(median_mask(maps[-1].float())[:, 0], expected))
    assert any(last_alone_differs)  # so the check above tells a sum from the last layer's maps


def test_sdxl_lag_adds_no_unet_evaluation(xl_pipe):
    from persres.sample import generate
    from persres.tokens import BoundConcept

    residuals.new_concept(xl_pipe.unet, "a", residuals.ranks_for(xl_pipe.unet), init="random")
    calls = []
    handle = xl_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    concept = BoundConcept("a", "sks", "circle")
    plain = generate(xl_pipe, "a sks circle on a red background", [concept], SampleConfig(steps=3))
    n = len(calls)
    lagged = generate(xl_pipe, "a sks circle on a red background", [concept], SampleConfig(steps=3, lag=True, save_masks=True))
    handle.remove()
    assert n == 3 and len(calls) == 6  # one batched (uncond, cond) evaluation per step either way
    assert list(plain.images[0].getdata()) != list(lagged.images[0].getdata())
    assert 0 < lagged.masks["a"][0].mean() < 1


def test_two_concepts_on_sdxl_get_disjoint_regions(xl_pipe):
    from persres.sample import generate
    from persres.tokens import BoundConcept

    for name, seed in (("a", 0), ("b", 1)):
        residuals.new_concept(xl_pipe.unet, name, residuals.ranks_for(xl_pipe.unet), init="random", seed=seed)
    concepts = [BoundConcept("a", "sks", "circle"), BoundConcept("b", "zwx", "star")]
    out = generate(xl_pipe, "a sks circle and a zwx star", concepts, SampleConfig(steps=2, lag=True, save_masks=True))
    a, b = out.masks["a"][0], out.masks["b"][0]
    assert a.mean() > 0 and b.mean() > 0
    assert (a + b).max() <= 1 + 1e-6  # per block disjoint, so their averages never sum past 1


def test_cli_trains_on_sdxl_records_the_family_and_refuses_the_pack_on_sd1(tiny_xl_model, tiny_model, concept_dir, tmp_path):
    from typer.testing import CliRunner

    from persres.cli import app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    result = run("train", concept_dir, "--name", "xl", "--class", "circle", "--model", tiny_xl_model, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(run("show", "xl", "--json").stdout)["family"] == "sdxl"
    listed = run("list").stdout
    assert "SDXL" in listed
    made = run("gen", "a V* circle", "-c", "xl", "--model", tiny_xl_model, "--steps", "2", "--lag", "--out", tmp_path / "o")
    assert made.exit_code == 0, made.output
    refused = run("gen", "a V* circle", "-c", "xl", "--model", tiny_model, "--steps", "2", "--out", tmp_path / "p")
    assert refused.exit_code == 1
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "an SDXL pack, not SD 1.x" in lines[0], refused.output
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_packs_from_before_the_family_field_get_it_inferred():
    from persres.packs import PackMeta

    def meta(proj_out, channels):
        return PackMeta(name="a", identifier="sks", class_word="dog", ranks={b: 1 for b in channels}, channels=channels,
                        parameter_count=2 * sum(channels.values()), base_model="m", architecture="x", weights="y",
                        proj_out=proj_out)

    assert families.of_meta(meta("Conv2d", {"b0": 320})).key == "sd1"
    assert families.of_meta(meta("Linear", {f"b{i}": 640 if i < 5 else 1280 for i in range(11)})).key == "sdxl"
    assert families.of_meta(meta("Linear", {f"b{i}": 320 for i in range(16)})).key == "sd2"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_exports_load_in_diffusers_at_scale_one_and_import_back(fmt, tiny_xl_model, concept_dir, tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    from persres.workspace import Workspace
    from persres.interop import write_lora
    from persres.models import load_pipeline
    from persres.registry import Registry

    Workspace(str(tiny_xl_model)).train(concept_dir, "xl", "circle", config=TrainConfig(steps=2, lr=1e-2, init="random"))
    tensors, meta = Registry().load("xl")
    path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, tensors, meta)
    with safe_open(str(path), framework="pt") as f:
        keys, md = set(f.keys()), f.metadata()
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["modelspec.architecture"].startswith("stable-diffusion-xl")
    if fmt == "kohya":  # SGM names, as sd-scripts writes SDXL LoRAs and ComfyUI reads them
        assert {k.split(".")[0] for k in keys} == {
            "lora_unet_input_blocks_4_1_proj_out", "lora_unet_input_blocks_5_1_proj_out", "lora_unet_middle_block_1_proj_out",
            "lora_unet_output_blocks_0_1_proj_out", "lora_unet_output_blocks_1_1_proj_out", "lora_unet_output_blocks_2_1_proj_out"}
    pipe = load_pipeline(str(tiny_xl_model))
    blocks = residuals.transformer_blocks(pipe.unet)
    expected = {b: blocks[b].proj_out.weight.detach() + tensors[f"{b}.up"] @ tensors[f"{b}.down"] for b in meta.ranks}
    pipe.load_lora_weights(str(path), adapter_name="mine")
    pipe.fuse_lora()
    named = dict(pipe.unet.named_modules())
    for block in meta.ranks:
        layer = named[f"{block}.proj_out"]
        got = getattr(layer, "base_layer", layer).weight.detach()
        torch.testing.assert_close(got, expected[block], rtol=0, atol=1e-6, msg=block)
    record = Workspace(str(tiny_xl_model)).import_concept(path, "back")
    assert record.meta.family == "sdxl"
    back, _ = Registry().load("back")
    for key in tensors:
        assert torch.equal(back[key], tensors[key]), key


@pytest.fixture(scope="session")
def single_file(tiny_model, tmp_path_factory):
    from persres.testing import save_original_layout

    return save_original_layout(tiny_model, tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors")


def cli(*args):
    from typer.testing import CliRunner

    from persres.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_single_file_checkpoint_loads_with_a_config_dir_like_its_diffusers_directory(single_file, tiny_model):
    from persres.models import fingerprint, load_pipeline, single_file_family

    assert single_file_family(str(single_file)).key == "sd1"
    from_file = load_pipeline(str(single_file), config=str(tiny_model))
    from_dir = load_pipeline(str(tiny_model))
    assert fingerprint(from_file.unet) == fingerprint(from_dir.unet)  # packs move between the two
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_dir, part).state_dict(), getattr(from_file, part).state_dict()
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), part


def test_cli_trains_on_a_single_file_and_records_its_sha256(single_file, tiny_model, concept_dir, tmp_path):
    import hashlib

    result = cli("train", concept_dir, "--name", "f", "--class", "circle", "--model", single_file, "--config", tiny_model,
                 "--steps", "2")
    assert result.exit_code == 0, result.output
    shown = json.loads(cli("show", "f", "--json").stdout)
    assert shown["train_config"]["checkpoint_sha256"] == hashlib.sha256(single_file.read_bytes()).hexdigest()
    assert shown["base_model"] == str(single_file) and shown["family"] == "sd1"
    made = cli("gen", "a V* circle", "-c", "f", "--model", tiny_model, "--steps", "2", "--out", tmp_path / "o")
    assert made.exit_code == 0, made.output  # same weights as the directory: the pack fits it without a warning
    assert "another checkpoint" not in made.output


def test_config_model_remembers_a_single_file_and_its_configs(single_file, tiny_model, concept_dir):
    set_ = cli("config", "model", single_file, "--config", tiny_model)
    assert set_.exit_code == 0, set_.output
    assert str(single_file) in set_.stdout and str(tiny_model) in set_.stdout
    result = cli("train", concept_dir, "--name", "g", "--class", "circle", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(cli("show", "g", "--json").stdout)["base_model"] == str(single_file)


def test_single_file_mistakes_get_one_line(single_file, tiny_xl_model, concept_dir, tmp_path):
    from safetensors.torch import save_file

    not_sd = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(not_sd))
    cases = {
        f"not a checkpoint of {families.described()}": ("train", concept_dir, "--name", "a", "--class", "circle", "--model", not_sd),
        "is for SDXL, but": ("train", concept_dir, "--name", "a", "--class", "circle", "--model", single_file, "--config", tiny_xl_model),
        "--config is for single-file": ("config", "model", tiny_xl_model, "--config", tiny_xl_model),
        "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5": (
            "train", concept_dir, "--name", "a", "--class", "circle", "--model", single_file),
    }
    for expected, args in cases.items():
        result = cli(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], (expected, result.output)
    assert cli("list", "--json").stdout.strip() == "[]"


def test_v_prediction_models_train_on_v_and_export_as_v(tiny_linear_model, concept_dir, tmp_path):
    import shutil

    from safetensors import safe_open

    from persres.workspace import Workspace
    from persres.interop import write_lora
    from persres.registry import Registry

    model = tmp_path / "v-model"
    shutil.copytree(tiny_linear_model, model)
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched | {"prediction_type": "v_prediction"}))
    outcome = Workspace(str(model)).train(concept_dir, "v", "circle", config=TrainConfig(steps=40, lr=1e-2))
    assert sum(outcome.losses[-10:]) < sum(outcome.losses[:10])
    tensors, meta = Registry().load("v")
    assert meta.family == "sd2" and meta.train_config["prediction_type"] == "v_prediction"
    with safe_open(str(write_lora(tmp_path / "k.safetensors", "kohya", tensors, meta)), framework="pt") as f:
        md = f.metadata()
    assert md["modelspec.prediction_type"] == "v" and md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_sdxl_gen_refuses_a_prompt_its_two_tokenizers_split_differently(xl_pipe):
    """A concept's maps are read by token position: both tokenizers must agree on them at gen too."""
    from transformers import CLIPTokenizer

    from persres.config import SampleConfig
    from persres.errors import PromptError
    from persres.sample import generate
    from persres.tokens import BoundConcept

    residuals.new_concept(xl_pipe.unet, "a", residuals.ranks_for(xl_pipe.unet), init="random")
    prompt = "a sks circle"
    concept = [BoundConcept("a", "sks", "circle")]
    generate(xl_pipe, prompt, concept, SampleConfig(steps=1, lag=True))  # the same tokenizer twice: fine
    letters = {c: i for i, c in enumerate(["<|startoftext|>", "<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz", *(c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz")])}
    xl_pipe.tokenizer_2 = CLIPTokenizer(vocab=letters, merges=[], model_max_length=xl_pipe.tokenizer.model_max_length)
    with pytest.raises(PromptError, match="split"):
        generate(xl_pipe, prompt, concept, SampleConfig(steps=1, lag=True))
