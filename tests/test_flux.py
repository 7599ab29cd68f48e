"""FLUX.1: residuals on the single-stream blocks' proj_out, flow-matching training, LAG on joint
attention and FLUX LoRA files, on a tiny FLUX pipeline built in code and loaded from disk the
way black-forest-labs/FLUX.1-dev is (`persres.testing.flux`)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persres import residuals
from persres.config import SampleConfig, TrainConfig
from persres.errors import IncompatiblePack, InputError, PromptError
from persres import families
from persres.families import FLUX_RANK_RATIO
from persres.testing.flux import FLUX_DEV_TRANSFORMER_CONFIG, build_tiny_flux_pipeline
from persres.sample import concept_tokens, generate
from persres.testing import SD14_UNET_CONFIG, above_lower_median, concept_shares, linear_delta
from persres.tokens import BoundConcept

SIZE = 32  # px: an 8 x 8 grid of packed image tokens on the tiny model


@pytest.fixture
def flux_pipe(tiny_flux):
    from persres.models import load_pipeline

    return load_pipeline(str(tiny_flux), dtype=torch.float32)


def transformer_of(pipe):
    return pipe.transformer


def add_random_concept(model, name: str, seed: int = 0, scale: float = 4.0) -> None:
    residuals.new_concept(model, name, residuals.ranks_for(model), init="random", seed=seed)
    for layer in residuals.layers_of(model).values():  # large enough that a wrong mask cannot hide in rounding
        layer.residuals[name].up.data.mul_(scale)


def test_flux_dev_residuals_keep_the_papers_share_of_the_model():
    """FLUX.1-dev's real config on the meta device: 38 single-stream blocks, proj_out 15360 -> 3072,
    rank 24 by the family's rule, 16,809,984 parameters: the same share of the transformer as the
    paper's 1,239,040 are of SD v1.4's UNet."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG)
        sd = UNet2DConditionModel(**SD14_UNET_CONFIG)
    assert families.of(type("P", (), {"transformer": flux})()).key == "flux"
    ranks = residuals.ranks_for(flux, FLUX_RANK_RATIO)
    channels, ins = residuals.block_channels(flux), residuals.block_in_channels(flux)
    assert len(ranks) == 38 and set(ranks.values()) == {24}
    assert set(channels.values()) == {3072} and set(ins.values()) == {15360}
    count = residuals.parameter_count(ranks, channels, ins)
    factors = residuals.new_concept(flux, "c", ranks)
    assert sum(p.numel() for f in factors.values() for p in f.parameters()) == count == 16_809_984
    flux_share = count / (sum(p.numel() for p in flux.parameters()) - count)
    sd_share = 1_239_040 / sum(p.numel() for p in sd.parameters())
    assert abs(flux_share - sd_share) / sd_share < 0.05, (flux_share, sd_share)
    paper_rule = residuals.parameter_count(residuals.ranks_for(flux, 0.05), channels, ins)
    assert paper_rule == 107_864_064  # what r = 0.05 m would cost: 0.9% of the model


def test_the_family_is_read_from_the_files_and_its_defaults_apply(tiny_flux):
    from persres.models import family_of_model
    from persres.workspace import Workspace

    assert family_of_model(str(tiny_flux)).key == "flux"
    ws = Workspace(str(tiny_flux))
    assert ws.train_config().rank_ratio == FLUX_RANK_RATIO
    assert ws.settings_sources()["rank_ratio"] == "model default"
    assert ws.train_config({"rank_ratio": 0.05}).rank_ratio == 0.05  # --rank-ratio still overrides


def test_merge_and_unmerge_are_exact_and_the_merged_layer_is_w_plus_ab(flux_pipe):
    model = transformer_of(flux_pipe)
    add_random_concept(model, "a")
    layer = residuals.layers_of(model)["single_transformer_blocks.0"]
    before = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 5, layer.in_channels)  # (B, T+N, n)
    with residuals.use_concepts(model, ["a"], merged=False):
        unmerged = layer(x)
    with residuals.use_concepts(model, ["a"], merged=True):
        merged_weight = layer.base_layer.weight.detach().clone()
        merged = layer(x)
    factors = layer.residuals["a"]
    torch.testing.assert_close(merged_weight, before + factors.up.detach() @ factors.down.detach())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.base_layer.weight, before)  # unmerged bit for bit


def test_training_lowers_the_flow_matching_loss_on_the_same_draws(flux_pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import objective_for, train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    config = TrainConfig(steps=80, lr=1e-2, resolution=SIZE, rank_ratio=FLUX_RANK_RATIO)
    model = transformer_of(flux_pipe)
    prompt = "a photo of a sks circle"

    def held_out_loss() -> float:
        loss = objective_for(flux_pipe, images, prompt, SIZE, config.replace(batch_size=16))
        with torch.no_grad():
            return sum(loss(torch.Generator().manual_seed(100 + k)).item() for k in range(4)) / 4

    base = held_out_loss()
    result = train_residuals(flux_pipe, images, "sks", "circle", config)
    assert residuals.loaded_concepts(model) == []  # the pipeline is left as it was
    residuals.load_concept(model, "trained", result.tensors)
    with residuals.use_concepts(model, ["trained"], merged=False):
        trained = held_out_loss()
    assert trained < 0.97 * base, (base, trained)
    assert result.parameter_count == sum(t.numel() for t in result.tensors.values())
    assert result.tensors["single_transformer_blocks.0.down"].shape[1] == 80  # (r, n): attention + MLP features


def test_the_objective_is_rectified_flow_on_the_packed_latents(flux_pipe, concept_dir):
    """What the transformer is given and asked for, recomputed from the same draws: x_σ = (1 - σ) x0 + σ ε
    at timestep σ with the guidance input, loss = mean((prediction - (ε - x0))²)."""
    from persres.families import flux
    from persres.images import read_folder
    from persres.train import cache_inputs

    images = [r.image for r in read_folder(concept_dir)]
    source = cache_inputs(flux_pipe, images, "a photo of a sks circle", SIZE, flip=True)
    loss_of = flux.flow_matching_objective(flux_pipe, source, batch_size=3)
    seen = {}
    model = flux_pipe.transformer
    hook = model.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, pred=out[0]), with_kwargs=True)
    try:
        loss = loss_of(torch.Generator().manual_seed(7))
    finally:
        hook.remove()
    again = torch.Generator().manual_seed(7)
    x0 = flux.pack(flux_pipe, source.sample(3, again).latents)  # the same draws, in the same order
    noise = torch.randn(x0.shape, generator=again)
    sigma = seen["timestep"].view(-1, 1, 1)
    assert x0.shape == (3, (SIZE // flux_pipe.vae_scale_factor // 2) ** 2, 4 * flux_pipe.vae.config.latent_channels)
    assert ((0 < sigma) & (sigma < 1)).all()
    torch.testing.assert_close(seen["hidden_states"], (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(seen["guidance"], torch.full((3,), flux.TRAIN_GUIDANCE))
    torch.testing.assert_close(loss, ((seen["pred"] - (noise - x0)) ** 2).mean())


def test_gradient_checkpointing_recomputes_the_blocks_and_learns_the_same_factors(flux_pipe, concept_dir):
    """What fits FLUX.1-dev training on one GPU (docs/benchmarks.md): each block's forward runs again in
    the backward, and the factors come out the same."""
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    block = flux_pipe.transformer.single_transformer_blocks[0]
    runs = {}
    for checkpointing in (False, True):
        calls = []
        hook = block.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            result = train_residuals(flux_pipe, images, "sks", "circle",
                                     TrainConfig(steps=3, resolution=SIZE, gradient_checkpointing=checkpointing))
        finally:
            hook.remove()
        runs[checkpointing] = result.tensors, len(calls)
    assert runs[False][1] == 3 and runs[True][1] == 6
    assert all(torch.allclose(runs[False][0][k], runs[True][0][k], atol=1e-6) for k in runs[False][0])


def test_training_sigmas_are_the_pipelines_own_shifted_sigmas(flux_pipe):
    """σ drawn for training goes through the same shift the pipeline applies to its sampling sigmas."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from persres.families.flux import image_shift, shifted_sigmas

    scheduler = flux_pipe.scheduler
    tokens = (SIZE // flux_pipe.vae_scale_factor // 2) ** 2
    mu = image_shift(scheduler, tokens)
    c = scheduler.config
    assert mu == calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    grid = np.linspace(1.0, 1 / 10, 10)
    scheduler.set_timesteps(sigmas=grid, mu=mu)
    torch.testing.assert_close(shifted_sigmas(scheduler, torch.tensor(grid, dtype=torch.float32), mu), scheduler.sigmas[:-1])


def test_min_snr_weighting_is_refused_on_flux(flux_pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    with pytest.raises(InputError, match="flow matching"):
        train_residuals(flux_pipe, images, "sks", "circle", TrainConfig(steps=1, resolution=SIZE, snr_gamma=5.0))


def test_identifier_positions_are_read_under_t5_where_it_is_several_tokens(flux_pipe):
    prompt = "a photo of a sks circle"
    clip, t5 = flux_pipe.tokenizer, flux_pipe.tokenizer_2
    assert len(clip("sks", add_special_tokens=False).input_ids) == 1
    pieces = t5("sks", add_special_tokens=False).input_ids
    assert len(pieces) > 1  # one CLIP token, several T5 tokens
    [tokens] = concept_tokens(families.of(flux_pipe).region_tokenizer(flux_pipe), prompt, [BoundConcept("a", "sks", "circle")])
    ids = t5(prompt).input_ids
    identifier = [p for p in tokens.positions if p not in tokens.class_positions]
    assert [ids[p] for p in identifier] == pieces
    assert [ids[p] for p in tokens.class_positions] == t5("circle", add_special_tokens=False).input_ids


def test_training_refuses_an_identifier_past_t5s_limit(flux_pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    long_prompt = " ".join(["red"] * 60) + " {identifier} {class_word}"  # within CLIP's 77, past the tiny T5's 48
    with pytest.raises(PromptError, match="cut off"):
        train_residuals(flux_pipe, images, "sks", "circle", TrainConfig(steps=1, resolution=SIZE, prompt=long_prompt))


# --- LAG on joint attention ----------------------------------------------------------------------

def independent_map(attn, hidden, rotary, positions, image_tokens: int) -> torch.Tensor:
    """(B, N): each image query's attention to the concept's text tokens, from the module's own
    weights and the full softmax over the joint sequence."""
    from diffusers.models.embeddings import apply_rotary_emb

    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (attn.heads, -1)))  # (B, T+N, heads, d)
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (attn.heads, -1)))
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k = q.transpose(1, 2).double(), k.transpose(1, 2).double()  # (B, heads, T+N, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, heads, T+N, T+N)
    return probs[..., list(positions)].sum(-1).mean(1)[:, -image_tokens:]  # (B, N)


@pytest.mark.parametrize("strength,backend", [(1.0, None), (0.6, "reference")])
def test_lag_on_joint_attention_is_the_paper_rule_recomputed_independently(flux_pipe, strength, backend):
    """Every single-stream block, every step: proj_out gives W x + s * M ⊙ ΔW x on the image tokens and
    W x on the text tokens, M the median-binarized map recomputed here; one transformer call a step."""
    model = transformer_of(flux_pipe)
    add_random_concept(model, "a")
    concept = BoundConcept("a", "sks", "circle", strength)
    prompt = "a sks circle on a red background"
    [tokens] = concept_tokens(families.of(flux_pipe).region_tokenizer(flux_pipe), prompt, [concept])
    image_tokens = (SIZE // flux_pipe.vae_scale_factor // 2) ** 2
    maps, checked, calls = {}, [], []
    hooks = [model.register_forward_pre_hook(lambda *a: calls.append(1))]
    for i, block in enumerate(model.single_transformer_blocks):
        def record(module, args, kwargs, output, name=f"single_transformer_blocks.{i}"):
            maps[name] = independent_map(module, kwargs["hidden_states"], kwargs["image_rotary_emb"], tokens.positions, image_tokens)
        hooks.append(block.attn.register_forward_hook(record, with_kwargs=True))
    for name, layer in residuals.layers_of(model).items():
        def check(module, args, output, name=name):
            x = args[0]  # (B, T+N, n)
            mask = above_lower_median(maps.pop(name))  # (B, N)
            text = x.shape[1] - mask.shape[1]
            expected = module.base_layer(x).double()
            expected[:, text:] += strength * mask.unsqueeze(-1) * linear_delta(module, "a", x[:, text:])
            torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)
            assert 0 < mask.mean().item() < 1
            checked.append(name)
        hooks.append(layer.register_forward_hook(check))
    try:
        result = generate(flux_pipe, prompt, [concept], SampleConfig(steps=3, lag=True, height=SIZE, width=SIZE), backend=backend)
    finally:
        for h in hooks:
            h.remove()
    blocks = set(residuals.layers_of(model))
    assert len(checked) == 3 * len(blocks) and set(checked) == blocks
    assert len(calls) == 3  # no extra transformer evaluation
    assert result.images[0].size == (SIZE, SIZE)


def test_two_concepts_act_in_disjoint_regions_of_the_image_tokens_only(flux_pipe):
    model = transformer_of(flux_pipe)
    names = ["a", "b"]
    for seed, name in enumerate(names):
        add_random_concept(model, name, seed=seed)
    concepts = [BoundConcept("a", "sks", "circle"), BoundConcept("b", "zwx", "square")]
    steps, acted, calls, seen = 5, {n: 0.0 for n in names}, [], []
    image_tokens = (SIZE // flux_pipe.vae_scale_factor // 2) ** 2

    def check(module, args, output):
        x = args[0]
        added = output.double() - module.base_layer(x).double()  # (B, T+N, m)
        text = x.shape[1] - image_tokens
        assert added[:, :text].abs().max() < 1e-5  # never on the text tokens
        deltas = torch.stack([linear_delta(module, n, x) for n in names])[:, :, text:]  # (K, B, N, m)
        shares, error = concept_shares(added[:, text:], deltas, channel_dim=-1)
        assert error < 1e-4  # each image token: nothing, or exactly one concept's ΔW x
        for name, share in zip(names, shares):
            assert share <= 0.5 + 1.0 / image_tokens
            acted[name] = max(acted[name], share)
        seen.append(1)

    hooks = [layer.register_forward_hook(check) for layer in residuals.layers_of(model).values()]
    hooks.append(model.register_forward_pre_hook(lambda *a: calls.append(1)))
    try:
        result = generate(flux_pipe, "a sks circle and a zwx square", concepts,
                          SampleConfig(steps=steps, lag=True, height=SIZE, width=SIZE, save_masks=True))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == steps
    assert seen and all(share > 0 for share in acted.values()), acted
    assert set(result.masks) == {"a", "b"}


# --- the CLI, packs and LoRA files ---------------------------------------------------------------

runner = CliRunner()


def cli(*args):
    from persres.cli import app

    return runner.invoke(app, [str(a) for a in args])


FAST = ("--steps", 4, "--resolution", SIZE, "--precision", "fp32")


@pytest.fixture
def two_flux_concepts(tiny_flux, concept_dir, second_concept_dir):
    for name, folder, word in (("x", concept_dir, "circle"), ("y", second_concept_dir, "heart")):
        result = cli("train", folder, "--name", name, "--class", word, "--model", tiny_flux, *FAST)
        assert result.exit_code == 0, result.output
    return tiny_flux


def test_cli_trains_lists_and_generates_two_concepts_with_lag(two_flux_concepts, tmp_path):
    listed = cli("list")
    assert listed.exit_code == 0 and listed.output.count("FLUX.1") == 2, listed.output
    out = tmp_path / "out"
    result = cli("gen", "a V1 circle and a V2 heart", "-c", "x", "-c", "y", "--lag", "--model", two_flux_concepts,
                 "--steps", 3, "--height", SIZE, "--width", SIZE, "--precision", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    [png] = out.glob("*.png")
    from PIL import Image

    image = Image.open(png)
    assert image.size == (SIZE, SIZE)
    assert image.text["guidance"] == "3.5"  # FLUX.1's own default, not the paper's 6.0 for SD


def test_export_and_import_round_trip_draw_the_same_pixels_and_diffusers_loads_both(two_flux_concepts, tmp_path):
    from safetensors import safe_open

    from persres.models import load_pipeline
    from persres.workspace import Workspace

    ws = Workspace(str(two_flux_concepts), precision="fp32")
    tensors, meta = ws.registry.load("x")
    original = ws.generate("a V* circle", ["x"], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
    for fmt, key in (("kohya", "lora_unet_single_blocks_0_linear2.lora_down.weight"),
                     ("diffusers", "transformer.single_transformer_blocks.0.proj_out.lora_A.weight")):
        path = ws.export("x", tmp_path / f"x-{fmt}.safetensors", fmt)
        with safe_open(str(path), "pt") as f:
            assert key in f.keys()
            info = f.metadata()
        assert info["ss_base_model_version"] == "flux1" and info["modelspec.architecture"] == "flux-1-dev/lora"
        # diffusers' own FLUX LoRA loader: fused weight = W + A B on every single-stream block
        pipe = load_pipeline(str(two_flux_concepts), dtype=torch.float32)
        blocks = pipe.transformer.single_transformer_blocks
        base = {b: blocks[int(b.rsplit(".", 1)[1])].proj_out.weight.detach().clone() for b in meta.ranks}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        for b in meta.ranks:
            delta = tensors[f"{b}.up"] @ tensors[f"{b}.down"]
            assert delta.abs().max() > 0
            torch.testing.assert_close(blocks[int(b.rsplit(".", 1)[1])].proj_out.weight.detach(), base[b] + delta)
        record = ws.import_concept(path, name=f"x-{fmt}", class_word="circle", identifier=meta.identifier)
        again = ws.generate(f"a <{record.name}> circle", [], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
        assert np.array_equal(np.asarray(again), np.asarray(original)), fmt


def test_sd_packs_are_refused_on_flux_and_flux_packs_on_sd(two_flux_concepts, tiny_model, concept_dir, tmp_path):
    sd = cli("train", concept_dir, "--name", "sdpack", "--class", "circle", "--model", tiny_model, "--steps", 2,
             "--precision", "fp32")
    assert sd.exit_code == 0, sd.output
    for concept, model, words in (("sdpack", two_flux_concepts, ("SD 1.x", "FLUX.1")), ("x", tiny_model, ("FLUX.1", "SD 1.x"))):
        result = cli("gen", "a V* thing", "-c", concept, "--model", model, "--steps", 2, "--height", SIZE, "--width", SIZE,
                     "--precision", "fp32", "--out", tmp_path / "o")
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
    with pytest.raises(IncompatiblePack):
        from persres.workspace import Workspace

        Workspace(str(tiny_model)).apply_concepts(["x"])


def test_class_word_suggestion_says_to_give_the_class_on_flux(tiny_flux, concept_dir):
    result = cli("train", concept_dir, "--name", "z", "--model", tiny_flux, *FAST)
    assert result.exit_code == 1 and "--class" in result.output and "FLUX.1" in result.output


def test_a_flux_single_file_is_recognized_and_its_config_checked(tiny_flux, tiny_model, tmp_path):
    """A Black Forest Labs-layout file (its tensor names) is FLUX.1; --config must be a FLUX directory."""
    from safetensors.torch import save_file

    from persres.errors import ModelNotFound
    from persres.models import check_single_file_config, single_file_family

    path = tmp_path / "flux1-tiny.safetensors"
    save_file({"single_blocks.0.linear2.weight": torch.zeros(2, 2), "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
              str(path))
    assert single_file_family(str(path)).key == "flux"
    assert check_single_file_config(str(path), str(tiny_flux)).key == "flux"
    with pytest.raises(ModelNotFound, match="is for SD 1.x, but"):
        check_single_file_config(str(path), str(tiny_model))


def test_a_flux_lora_with_other_targets_is_refused_unless_told_to_keep_only_proj_out(two_flux_concepts, tmp_path):
    from safetensors.torch import load_file, save_file

    from persres.errors import PackError
    from persres.interop.lora import DroppedTargetsWarning
    from persres.workspace import Workspace

    ws = Workspace(str(two_flux_concepts), precision="fp32")
    tensors, meta = ws.registry.load("x")
    exported = load_file(str(ws.export("x", tmp_path / "x.safetensors", "kohya")))
    other = "lora_unet_double_blocks_0_img_attn_proj"  # a double-stream block's attention output: not persres's layer
    exported |= {f"{other}.lora_down.weight": torch.zeros(2, 16), f"{other}.lora_up.weight": torch.zeros(16, 2),
                 f"{other}.alpha": torch.tensor(2.0)}
    mixed = tmp_path / "mixed.safetensors"
    save_file(exported, str(mixed))
    whole = ws.import_concept(mixed, name="whole", class_word="circle")  # every layer kept, as the file has them
    assert "transformer.transformer_blocks.0.attn.to_out.0" in whole.meta.layers and whole.meta.ranks == {}
    with pytest.warns(DroppedTargetsWarning):
        record = ws.import_concept(mixed, name="mixed", class_word="circle", proj_out_only=True)
    kept, _ = ws.registry.load(record.name)
    assert all(torch.equal(kept[k], tensors[k]) for k in tensors)


def test_a_flux_single_file_that_does_not_convert_is_one_line(tiny_flux, concept_dir, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux1-broken.safetensors"
    save_file({"single_blocks.0.linear2.weight": torch.zeros(2, 2)}, str(path))
    result = cli("train", concept_dir, "--name", "z", "--class", "circle", "--model", path, "--config", tiny_flux, *FAST)
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert result.exit_code == 1 and len(errors) == 1 and "(FLUX.1) did not load" in errors[0], result.output
    assert "Traceback" not in result.output


def test_a_black_forest_labs_single_file_loads_with_its_config_as_the_directory_does(tmp_path):
    """flux1-dev.safetensors' layout through `FluxTransformer2DModel.from_single_file` and --config: the same
    weights, the same fingerprint (packs trained on either fit both), the family read from the file."""
    from persres.testing.flux import build_wide_flux_pipeline, save_original_layout
    from persres.models import family_of_model, fingerprint, load_pipeline

    folder = build_wide_flux_pipeline(tmp_path / "wide-flux")
    from_dir = load_pipeline(str(folder), dtype=torch.bfloat16)
    single = save_original_layout(from_dir.transformer, tmp_path / "flux1-wide.safetensors")
    from_file = load_pipeline(str(single), dtype=torch.bfloat16, config=str(folder))
    assert type(from_file).__name__ == "FluxPipeline" and family_of_model(str(single)).key == "flux"
    ours, theirs = from_dir.transformer.state_dict(), from_file.transformer.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert fingerprint(from_file.transformer) == fingerprint(from_dir.transformer)


def test_base_weights_are_read_from_the_transformers_files_without_loading(tiny_flux, tmp_path, monkeypatch):
    """What tells packs of other weights at the same path apart: read from transformer/*.safetensors
    (one file or shards) and equal to the loaded transformer's fingerprint."""
    import shutil

    from diffusers import FluxTransformer2DModel

    import persres.models as models
    from persres.models import base_weights, fingerprint, load_pipeline

    expected = fingerprint(load_pipeline(str(tiny_flux)).transformer).weights
    sharded = shutil.copytree(tiny_flux, tmp_path / "sharded", ignore=shutil.ignore_patterns("transformer"))
    FluxTransformer2DModel.from_pretrained(str(tiny_flux), subfolder="transformer").save_pretrained(
        sharded / "transformer", max_shard_size="20KB")
    assert (sharded / "transformer" / models.files.INDEX).is_file()
    monkeypatch.setattr(models.load, "load_pipeline", lambda *a, **k: pytest.fail("read from the files, not loaded"))
    assert base_weights(str(tiny_flux)) == base_weights(str(sharded)) == expected


def test_an_attention_backend_without_lag_is_refused_on_flux_not_ignored(flux_pipe):
    with pytest.raises(InputError, match="--lag"):
        generate(flux_pipe, "a red circle", [], SampleConfig(steps=1, height=SIZE, width=SIZE), backend="reference")
    assert generate(flux_pipe, "a red circle", [], SampleConfig(steps=1, height=SIZE, width=SIZE), backend="auto").images


def test_the_web_app_trains_and_generates_on_flux(tiny_flux, concept_dir, tmp_path, monkeypatch):
    """`persres ui` on a FLUX model at its API: train (the family's rank ratio in the form), generate with
    LAG and its region overlay, and a class suggestion refused with the one line that asks for the class."""
    import socket

    import gradio_client

    from persres.ui.app import serve
    from persres.workspace import Workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = Workspace(str(tiny_flux), precision="fp32")
    app, url = serve(ws, tmp_path / "out", port=port, block=False)
    try:
        client = gradio_client.Client(url, verbose=False)
        images = [gradio_client.handle_file(str(p)) for p in sorted(concept_dir.iterdir())]
        said = client.predict(images, "", "fx", "circle", 3, 1e-3, FLUX_RANK_RATIO, api_name="/train")
        assert said.startswith("trained fx") and ws.registry.get("fx").meta.family == "flux"
        gallery, regions = client.predict("a V* circle", ["fx"], True, 2, 3.5, 3, 1, f"{SIZE}x{SIZE}", ["fx"], api_name="/generate")
        assert len(gallery) == 2 and "fx:" in regions  # the image and its region overlay
        with pytest.raises(Exception, match="FLUX.1 give the class word"):
            client.predict(images, "", api_name="/suggest")
    finally:
        app.close()
