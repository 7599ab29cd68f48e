"""FLUX.2 (klein and dev): residuals on each single-stream block's fused attention + MLP output projection,
flow-matching training as the pipelines call the transformer (batch-norm-normalized 2x2 patches, the
pipeline's own μ), LAG on the single-stream joint attention with token positions inside each pipeline's
chat frame, klein's true CFG as two evaluations a step and dev's guidance input, and FLUX.2 LoRA files, on
tiny pipelines built in code and loaded from disk the way black-forest-labs' repos are
(`persres.testing.flux2`)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persres import families, residuals
from persres.config import SampleConfig
from persres.errors import IncompatiblePack
from persres.sample import concept_tokens, generate
from persres.testing import SD14_UNET_CONFIG, above_lower_median, concept_shares, linear_delta
from persres.testing.flux2 import (FLUX2_DEV_TRANSFORMER_CONFIG, FLUX2_KLEIN_4B_TRANSFORMER_CONFIG, FLUX2_KLEIN_9B_TRANSFORMER_CONFIG,
                                   FLUX2_SCHEDULER_CONFIG)
from persres.tokens import BoundConcept

SIZE = 24  # px: a 6 x 6 grid of image tokens on the tiny models (VAE factor 2, 2x2 patches)
IMAGE_TOKENS = (SIZE // 4) ** 2
KINDS = ("klein", "dev")


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def model_dir(kind, request):
    return request.getfixturevalue(f"tiny_flux2_{kind}")


@pytest.fixture
def fpipe(model_dir):
    from persres.models import load_pipeline

    return load_pipeline(str(model_dir), dtype=torch.float32)


@pytest.fixture
def kpipe(tiny_flux2_klein):
    from persres.models import load_pipeline

    return load_pipeline(str(tiny_flux2_klein), dtype=torch.float32)


def add_random_concept(model, name: str, seed: int = 0, scale: float = 4.0) -> None:
    residuals.new_concept(model, name, residuals.ranks_for(model, rank=4), init="random", seed=seed)
    for layer in residuals.layers_of(model).values():  # large enough that a wrong mask cannot hide in rounding
        layer.residuals[name].up.data.mul_(scale)


@pytest.mark.parametrize("config,key,rank,count", [
    (FLUX2_DEV_TRANSFORMER_CONFIG, "flux2", 32, 47_185_920),
    (FLUX2_KLEIN_4B_TRANSFORMER_CONFIG, "flux2klein", 19, 5_836_800),
    (FLUX2_KLEIN_9B_TRANSFORMER_CONFIG, "flux2klein", 26, 12_779_520),
])
def test_flux2_residuals_keep_the_papers_share_of_the_model(config, key, rank, count):
    """The real configs on the meta device: each single-stream block's attn.to_out (inner + MLP width -> dim), at
    the family's rank: the paper's share of SD v1.4's UNet within 5%."""
    from diffusers import Flux2Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
        sd = UNet2DConditionModel(**SD14_UNET_CONFIG)
    family = families.of(type("P", (), {"transformer": model})())
    assert family.key == key
    ranks = residuals.ranks_for(model, family.train_defaults["rank_ratio"])
    channels = residuals.block_channels(model)
    assert len(ranks) == config["num_single_layers"] and set(ranks.values()) == {rank}
    assert set(channels.values()) == {config["num_attention_heads"] * 128}
    total = residuals.parameter_count(ranks, channels, residuals.block_in_channels(model))
    factors = residuals.new_concept(model, "c", ranks)
    assert sum(p.numel() for f in factors.values() for p in f.parameters()) == total == count
    assert isinstance(model.single_transformer_blocks[0].attn.to_out, residuals.ResidualProjOut)
    share = count / (sum(p.numel() for p in model.parameters()) - count)
    sd_share = 1_239_040 / sum(p.numel() for p in sd.parameters())
    assert abs(share - sd_share) / sd_share < 0.05, (share, sd_share)


def test_the_family_is_read_from_the_files_and_its_defaults_apply(model_dir, kind):
    from persres.models import family_of_model
    from persres.workspace import Workspace

    family = family_of_model(str(model_dir))
    assert family.key == {"klein": "flux2klein", "dev": "flux2"}[kind]
    ws = Workspace(str(model_dir))
    assert ws.train_config().rank_ratio == family.train_defaults["rank_ratio"]
    config = ws.sample_config()
    assert (config.guidance, config.steps) == (4.0, 50)  # both pipelines' default guidance_scale, klein base's steps


def test_a_step_distilled_klein_samples_in_four_steps_without_guidance(tiny_flux2_klein, tmp_path):
    """klein's distilled models say so in model_index.json (`is_distilled`): their defaults are 4 steps and no
    guidance, read before loading and from the loaded pipeline; one evaluation a step, as the pipeline runs them."""
    import json
    import shutil

    from persres.workspace import Workspace

    distilled = tmp_path / "klein-distilled"
    shutil.copytree(tiny_flux2_klein, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    ws = Workspace(str(distilled), precision="fp32")
    assert (ws.sample_config().guidance, ws.sample_config().steps) == (1.0, 4)
    pipe = ws.pipeline()
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ws.generate("a sks dog", [], height=SIZE, width=SIZE)
    finally:
        hook.remove()
    assert len(calls) == 4 and (ws.sample_config().guidance, ws.sample_config().steps) == (1.0, 4)
    assert (Workspace(str(tiny_flux2_klein)).sample_config().steps, Workspace(str(tiny_flux2_klein)).sample_config().guidance) == (50, 4.0)


def test_token_positions_are_the_ones_the_text_encoder_reads(fpipe):
    """The ids the pipeline hands its text encoder (its chat frame: klein's Qwen3 template with thinking off,
    dev's system message) are the region tokenizer's, padded; the identifier's and the class word's positions
    hold their tokens; the conditioning is the padded sequence."""
    family = families.of(fpipe)
    prompt = "a photo of a sks dog"
    seen = {}
    hook = fpipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        condition = family.encode(fpipe, prompt, (SIZE, SIZE))
    finally:
        hook.remove()
    kept = seen["attention_mask"][0].bool()
    fed = seen["input_ids"][0][kept].tolist()
    tokenizer = family.region_tokenizer(fpipe)
    assert tokenizer(prompt).input_ids == fed
    [tokens] = concept_tokens(tokenizer, prompt, [BoundConcept("a", "sks", "dog")])
    text = family.text_tokenizer(fpipe)
    identifier = [p for p in tokens.positions if p not in tokens.class_positions]
    assert [fed[p] for p in identifier] == text(" sks", add_special_tokens=False).input_ids
    assert [fed[p] for p in tokens.class_positions] == text(" dog", add_special_tokens=False).input_ids
    assert condition.embedding.shape[:2] == (1, seen["input_ids"].shape[1])


def test_the_objective_is_the_pipelines_flow_on_normalized_patches(fpipe, concept_dir):
    """What the transformer is given and asked for, recomputed from the same draws: latents cut in 2x2 patches
    stacked as channels, (p - bn mean) / bn std per patch channel, tokens row by row; x_σ = (1 - σ) x0 + σ ε at
    timestep σ, σ shifted by the pipeline's own μ; the pipeline's text and image ids; dev's guidance input;
    loss = mean((prediction - (ε - x0))²)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from persres.families.flux import shifted_sigmas
    from persres.images import read_folder, to_tensor
    from persres.train import cache_inputs, center_square

    family = families.of(fpipe)
    images = [r.image for r in read_folder(concept_dir)]
    source = cache_inputs(fpipe, images, "a photo of a sks dog", SIZE, flip=True)
    z = fpipe.vae.encode(torch.stack([to_tensor(center_square(images[0], SIZE))])).latent_dist.mean
    torch.testing.assert_close(source.mean[:1], z)
    loss_of = family.objective(fpipe, source, type("C", (), {"batch_size": 3})())
    seen = {}
    hook = fpipe.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs=kwargs, pred=out[0]),
                                                   with_kwargs=True)
    try:
        loss = loss_of(torch.Generator().manual_seed(5))
    finally:
        hook.remove()
    gen = torch.Generator().manual_seed(5)
    batch = source.sample(3, gen)
    b, c, h, w = batch.latents.shape
    patches = batch.latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
    bn = fpipe.vae.bn
    patches = (patches - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
    x0 = patches.flatten(2).transpose(1, 2)  # (B, L, 4C): row by row
    noise = torch.randn(x0.shape, generator=gen)
    tokens = (h // 2) * (w // 2)
    sigma = shifted_sigmas(fpipe.scheduler, torch.rand((3,), generator=gen), compute_empirical_mu(tokens, family.steps))
    kwargs = seen["kwargs"]
    torch.testing.assert_close(kwargs["hidden_states"], (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise)
    torch.testing.assert_close(kwargs["timestep"], sigma)
    _, image_ids = fpipe.prepare_latents(3, c, SIZE, SIZE, torch.float32, "cpu", torch.Generator())  # the pipeline's own ids
    assert torch.equal(kwargs["img_ids"], image_ids)
    _, text_ids = fpipe.encode_prompt(prompt_embeds=source.condition.embedding.expand(3, -1, -1), prompt=None)
    assert torch.equal(kwargs["txt_ids"], text_ids)
    guidance = kwargs["guidance"]
    assert (guidance is None) if family.key == "flux2klein" else torch.equal(guidance, torch.full((3,), 4.0))
    assert torch.equal(kwargs["encoder_hidden_states"], source.condition.embedding.expand(3, -1, -1))
    torch.testing.assert_close(loss, ((seen["pred"] - (noise - x0)) ** 2).mean())


def test_the_patch_normalization_is_the_one_the_pipeline_undoes_before_decoding(kpipe):
    """The training tokens, unpacked and denormalized as Flux2KleinPipeline does before its VAE decodes, are the
    latents again."""
    from persres.families.flux2 import latent_tokens

    z = torch.randn(2, 4, 12, 12)
    x = latent_tokens(kpipe, z)  # (2, 36, 16)
    ids = kpipe._prepare_latent_ids(torch.empty(2, 16, 6, 6))
    back = kpipe._unpack_latents_with_ids(x, ids, 6, 6)
    bn = kpipe.vae.bn
    back = back * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + kpipe.vae.config.batch_norm_eps) + bn.running_mean.view(1, -1, 1, 1)
    torch.testing.assert_close(kpipe._unpatchify_latents(back), z)


def test_training_sigmas_are_the_pipelines_own_shifted_sigmas():
    """σ is shifted as the FLUX.2 pipelines set their schedule: `compute_empirical_mu` for the image's tokens and
    the step count, passed to the scheduler with the pipeline's sigma grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from persres.families.flux import shifted_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG)
    for tokens, steps in ((4096, 50), (1024, 50), (256, 28), (6000, 50)):
        mu = compute_empirical_mu(tokens, steps)
        grid = np.linspace(1.0, 1 / steps, steps)  # what the pipeline passes
        scheduler.set_timesteps(sigmas=grid, mu=mu)
        torch.testing.assert_close(shifted_sigmas(scheduler, torch.tensor(grid, dtype=torch.float32), mu), scheduler.sigmas[:-1])


# --- LAG on the single-stream joint attention ----------------------------------------------------

def independent_map(attn, hidden, freqs, positions) -> torch.Tensor:
    """(B, N): each image query's attention to the concept's text columns, from the module's own weights and the
    full softmax over the joint [text, image] keys."""
    from diffusers.models.embeddings import apply_rotary_emb

    qkv = attn.to_qkv_mlp_proj(hidden)[..., : 3 * attn.inner_dim]
    q, k = (norm(t.unflatten(-1, (attn.heads, -1))) for norm, t in zip((attn.norm_q, attn.norm_k), qkv.chunk(3, -1)[:2]))
    q, k = (apply_rotary_emb(t, freqs, sequence_dim=1).double().transpose(1, 2) for t in (q, k))  # (B, heads, L, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs[..., list(positions)].sum(-1).mean(1)[:, -IMAGE_TOKENS:]


@pytest.mark.parametrize("which,strength,guidance,backend", [
    ("klein", 1.0, 1.0, None), ("klein", 0.6, 3.0, "reference"), ("dev", 0.8, 4.0, None)])
def test_lag_on_joint_attention_is_the_paper_rule_recomputed_independently(request, which, strength, guidance, backend):
    """Every single-stream block, every evaluation: attn.to_out gives W x + s * M ⊙ ΔW x on the image tokens and
    W x on the text tokens, M the median-binarized map recomputed here. klein under true CFG runs each step as
    the pipeline's two evaluations, conditional then unconditional (the empty prompt): the unconditional one's M
    is the conditional one's maps averaged over blocks. dev's guidance is an input: one evaluation a step."""
    from persres.models import load_pipeline

    pipe = load_pipeline(str(request.getfixturevalue(f"tiny_flux2_{which}")), dtype=torch.float32)
    model = pipe.transformer
    add_random_concept(model, "a")
    concept = BoundConcept("a", "sks", "dog", strength)
    prompt = "a sks dog on a red background"
    [tokens] = concept_tokens(families.of(pipe).region_tokenizer(pipe), prompt, [concept])
    cfg = which == "klein" and guidance > 1
    maps, checked, calls, cond_maps = {}, [], [], {}
    hooks = [model.register_forward_pre_hook(lambda *a: calls.append(1))]
    for i, block in enumerate(model.single_transformer_blocks):
        def record(module, args, kwargs, name=f"single_transformer_blocks.{i}"):  # its to_out runs inside the attention
            found = independent_map(module, kwargs["hidden_states"], kwargs["image_rotary_emb"], tokens.positions)
            maps[name] = found
            if len(calls) % 2 == 1 or not cfg:
                cond_maps[name] = found
        hooks.append(block.attn.register_forward_pre_hook(record, with_kwargs=True))
    for name, layer in residuals.layers_of(model).items():
        def check(module, args, output, name=name):
            x = args[0]  # (B, T+N, inner + MLP): the joint sequence, text first
            conditional = len(calls) % 2 == 1 or not cfg
            found = maps.pop(name) if conditional else torch.stack(list(cond_maps.values())).mean(0)
            mask = above_lower_median(found)  # (B, N)
            expected = module.base_layer(x).double()
            expected[:, -IMAGE_TOKENS:] += strength * mask.unsqueeze(-1) * linear_delta(module, "a", x[:, -IMAGE_TOKENS:])
            torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)
            assert 0 < mask.mean().item() < 1
            checked.append((name, conditional))
        hooks.append(layer.register_forward_hook(check))
    try:
        result = generate(pipe, prompt, [concept], SampleConfig(steps=3, lag=True, height=SIZE, width=SIZE, guidance=guidance),
                          backend=backend)
    finally:
        for h in hooks:
            h.remove()
    blocks = set(residuals.layers_of(model))
    per_step = 2 if cfg else 1
    assert len(calls) == 3 * per_step  # the pipeline's own evaluations, none added
    assert len(checked) == 3 * per_step * len(blocks) and {n for n, _ in checked} == blocks
    assert sum(not c for _, c in checked) == (3 * len(blocks) if cfg else 0)
    assert result.images[0].size == (SIZE, SIZE)


def test_lag_attention_is_the_pipelines_own_where_no_residual_acts(fpipe):
    """With the concept at strength 0, LAG's attention (the fused kernel) draws what the pipeline's draws."""
    model = fpipe.transformer
    add_random_concept(model, "a")
    config = SampleConfig(steps=3, height=SIZE, width=SIZE, guidance=4.0)
    with residuals.use_concepts(model, [], merged=True):
        base = generate(fpipe, "a sks dog", [], config).images[0]
    lag = generate(fpipe, "a sks dog", [BoundConcept("a", "sks", "dog", 0.0)], config.replace(lag=True)).images[0]
    assert np.abs(np.asarray(base).astype(int) - np.asarray(lag).astype(int)).max() <= 1


def test_two_concepts_act_in_disjoint_regions_of_the_image_tokens_only(kpipe):
    model = kpipe.transformer
    names = ["a", "b"]
    for seed, name in enumerate(names):
        add_random_concept(model, name, seed=seed)
    concepts = [BoundConcept("a", "sks", "dog"), BoundConcept("b", "zwx", "cat")]
    steps, acted, calls, seen = 5, {n: 0.0 for n in names}, [], []

    def check(module, args, output):
        x = args[0]
        added = output.double() - module.base_layer(x).double()  # (B, T+N, m)
        assert added[:, :-IMAGE_TOKENS].abs().max() < 1e-5  # never on the text tokens
        deltas = torch.stack([linear_delta(module, n, x) for n in names])[:, :, -IMAGE_TOKENS:]  # (K, B, N, m)
        shares, error = concept_shares(added[:, -IMAGE_TOKENS:], deltas, channel_dim=-1)
        assert error < 1e-4  # each image token: nothing, or exactly one concept's ΔW x
        for name, share in zip(names, shares):
            assert share <= 0.5 + 1.0 / IMAGE_TOKENS
            acted[name] = max(acted[name], share)
        seen.append(1)

    hooks = [layer.register_forward_hook(check) for layer in residuals.layers_of(model).values()]
    hooks.append(model.register_forward_pre_hook(lambda *a: calls.append(1)))
    try:
        result = generate(kpipe, "a sks dog and a zwx cat", concepts,
                          SampleConfig(steps=steps, lag=True, height=SIZE, width=SIZE, guidance=4.0, save_masks=True))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2 * steps  # true CFG: the pipeline's conditional and unconditional evaluation a step
    assert seen and all(share > 0 for share in acted.values()), acted
    assert set(result.masks) == {"a", "b"}


def test_an_attention_backend_without_lag_is_refused_on_flux2_not_ignored(kpipe):
    from persres.errors import InputError

    with pytest.raises(InputError, match="FLUX.2 klein's attention with --lag only"):
        generate(kpipe, "a red circle", [], SampleConfig(steps=1, height=SIZE, width=SIZE), backend="reference")


# --- the CLI, packs and LoRA files ---------------------------------------------------------------

runner = CliRunner()


def cli(*args):
    from persres.cli import app

    return runner.invoke(app, [str(a) for a in args])


FAST = ("--steps", 4, "--resolution", SIZE, "--precision", "fp32")


@pytest.fixture
def two_concepts(model_dir, concept_dir, second_concept_dir):
    for name, folder, word in (("x", concept_dir, "dog"), ("y", second_concept_dir, "cat")):
        result = cli("train", folder, "--name", name, "--class", word, "--model", model_dir, *FAST)
        assert result.exit_code == 0, result.output
    return model_dir


def test_train_list_gen_with_lag_and_exports_that_diffusers_fuses_on_the_trained_layers(two_concepts, kind, tmp_path):
    """persres train -> list shows the family -> gen "a V1 ... and a V2 ..." --lag -> kohya (musubi-tuner's BFL
    names) and diffusers exports that the family's pipeline's own LoRA loader fuses as W + A B on exactly the
    trained layers; importing either back draws the same pixels."""
    from PIL import Image
    from safetensors import safe_open

    from persres.models import load_pipeline
    from persres.workspace import Workspace

    label = {"klein": "FLUX.2 klein", "dev": "FLUX.2 dev"}[kind]
    listed = cli("list")
    assert listed.exit_code == 0 and listed.output.count(label) == 2, listed.output
    out = tmp_path / "out"
    result = cli("gen", "a V1 dog and a V2 cat", "-c", "x", "-c", "y", "--lag", "--model", two_concepts, "--steps", 3,
                 "--height", SIZE, "--width", SIZE, "--precision", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    [png] = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (SIZE, SIZE) and float(image.text["guidance"]) == 4.0

    ws = Workspace(str(two_concepts), precision="fp32")
    tensors, meta = ws.registry.load("x")
    original = ws.generate("a V* dog", ["x"], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
    for fmt, key in (("kohya", "lora_unet_single_blocks_0_linear2.lora_down.weight"),
                     ("diffusers", "transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight")):
        path = ws.export("x", tmp_path / f"x-{fmt}.safetensors", fmt)
        with safe_open(str(path), "pt") as f:
            assert key in f.keys(), (fmt, sorted(f.keys())[:4])
        pipe = load_pipeline(str(two_concepts), dtype=torch.float32)
        before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        after = pipe.transformer.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"{b}.attn.to_out.weight" for b in meta.ranks}, (fmt, changed)
        for b in meta.ranks:
            torch.testing.assert_close(after[f"{b}.attn.to_out.weight"],
                                       before[f"{b}.attn.to_out.weight"] + tensors[f"{b}.up"] @ tensors[f"{b}.down"])
        record = ws.import_concept(path, name=f"x-{fmt}", class_word="dog", identifier=meta.identifier)
        again = ws.generate(f"a <{record.name}> dog", [], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
        assert np.array_equal(np.asarray(again), np.asarray(original)), fmt


def test_packs_of_other_families_are_refused_both_ways(tiny_flux2_klein, tiny_flux2_dev, tiny_flux, concept_dir, tmp_path):
    """FLUX.1, FLUX.2 klein and FLUX.2 dev packs all sit on single_transformer_blocks.N: each is refused on the
    others' models in one line naming both families."""
    models = {"flux1": (tiny_flux, "FLUX.1"), "klein": (tiny_flux2_klein, "FLUX.2 klein"), "dev": (tiny_flux2_dev, "FLUX.2 dev")}
    for name, (model, _) in models.items():
        result = cli("train", concept_dir, "--name", f"p{name}", "--class", "dog", "--model", model, *FAST)
        assert result.exit_code == 0, result.output
    for pack, on in (("klein", "flux1"), ("flux1", "klein"), ("klein", "dev"), ("dev", "klein")):
        result = cli("gen", "a V* dog", "-c", f"p{pack}", "--model", models[on][0], "--steps", 2, "--height", SIZE, "--width", SIZE,
                     "--precision", "fp32", "--out", tmp_path / "o")
        assert result.exit_code == 1, (pack, on, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and models[pack][1] in lines[0] and models[on][1] in lines[0], result.output
    from persres.workspace import Workspace

    with pytest.raises(IncompatiblePack):
        Workspace(str(tiny_flux)).apply_concepts(["pklein"])


def test_class_word_suggestion_says_to_give_the_class_on_flux2(tiny_flux2_klein, concept_dir):
    result = cli("train", concept_dir, "--name", "k", "--model", tiny_flux2_klein, *FAST)
    assert result.exit_code == 1 and "--class" in result.output and "FLUX.2 klein" in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error")] == [result.output.strip().splitlines()[-1]]


def test_an_original_layout_single_file_draws_what_the_directory_draws(two_concepts, kind, tmp_path):
    """The transformer in Black Forest Labs' layout, as ComfyUI keeps it (flux-2-klein-4b.safetensors), with
    --config for the rest: detected by its tensor names (klein: no guidance input), converted by diffusers to the
    same weights, the same pixels."""
    from persres.models import load_pipeline, single_file_family
    from persres.testing.flux2 import save_original_layout
    from persres.workspace import Workspace

    pipe = load_pipeline(str(two_concepts), dtype=torch.float32)
    path = save_original_layout(pipe.transformer, tmp_path / "flux2_tiny.safetensors")
    assert single_file_family(str(path)) is families.of(pipe)
    converted = load_pipeline(str(path), dtype=torch.float32, config=str(two_concepts)).transformer.state_dict()
    assert all(torch.equal(converted[k], v) for k, v in pipe.transformer.state_dict().items())
    images = []
    for model, config in ((str(two_concepts), None), (str(path), str(two_concepts))):
        ws = Workspace(model, precision="fp32", model_config=config)
        images.append(np.asarray(ws.generate("a V* dog", ["x"], lag=True, steps=2, height=SIZE, width=SIZE).images[0]))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


def test_the_web_app_trains_and_generates_on_flux2(tiny_flux2_klein, concept_dir, tmp_path):
    """`persres ui` on a FLUX.2 klein model at its API: train, generate with LAG and its region overlay under true
    CFG, and a class suggestion refused with the one line that asks for the class."""
    import socket

    import gradio_client

    from persres.ui.app import serve
    from persres.workspace import Workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = Workspace(str(tiny_flux2_klein), precision="fp32")
    app, url = serve(ws, tmp_path / "out", port=port, block=False)
    try:
        client = gradio_client.Client(url, verbose=False)
        images = [gradio_client.handle_file(str(p)) for p in sorted(concept_dir.iterdir())]
        said = client.predict(images, "", "kx", "dog", 3, 1e-3, 1 / 160, api_name="/train")
        assert said.startswith("trained kx") and ws.registry.get("kx").meta.family == "flux2klein"
        gallery, regions = client.predict("a V* dog", ["kx"], True, 2, 4.0, 3, 1, f"{SIZE}x{SIZE}", ["kx"], api_name="/generate")
        assert len(gallery) == 2 and "kx:" in regions  # the image and its region overlay
        with pytest.raises(Exception, match="FLUX.2 klein give the class word"):
            client.predict(images, "", api_name="/suggest")
    finally:
        app.close()


def test_train_many_trains_flux2_rows(tiny_flux2_klein, concept_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"images,name,class,steps\n{concept_dir},km,dog,2\n")
    result = cli("train-many", manifest, "--model", tiny_flux2_klein, "--device", "cpu")
    assert result.exit_code == 0, result.output
    from persres.registry import Registry

    assert Registry().get("km").meta.family == "flux2klein"


def test_any_flux2_lora_imports_every_layer_and_samples_under_lag(kpipe, tmp_path):
    """A LoRA of every transformer layer, as peft/diffusers, musubi-tuner (lora_unet_ + BFL's names, q/k/v fused)
    and ai-toolkit (diffusion_model. + BFL's dotted names) write it: persres keeps every layer with the file's
    ΔW, and two such LoRAs sample under LAG with the pipeline's two evaluations a step."""
    from safetensors.torch import load_file, save_file

    from persres.families.flux import original_layer_names
    from persres.families.flux2 import BFL_LAYERS
    from persres.testing.loras import random_lora
    from persres.workspace import Workspace

    deltas = random_lora(kpipe, tmp_path / "peft.safetensors", "peft", where=lambda k: k.startswith("transformer."))
    random_lora(kpipe, tmp_path / "kohya.safetensors", "kohya", where=lambda k: k.startswith("transformer."), layout="original")
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in kohya
    linears = [n for n, m in kpipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    dotted = {"lora_transformer_" + p.replace(".", "_"): p for p in linears}  # layers BFL has no name of its own for
    dotted.update({"lora_unet_" + n.replace(".", "_"): n for n in original_layer_names(BFL_LAYERS, linears)})
    toolkit = {}
    for key, value in kohya.items():
        name, rest = key.split(".", 1)
        toolkit[f"diffusion_model.{dotted[name]}.{rest.replace('lora_down', 'lora_A').replace('lora_up', 'lora_B')}"] = value
    save_file(toolkit, str(tmp_path / "toolkit.safetensors"))
    ws = Workspace(precision="fp32", pipe=kpipe)
    for fmt, identifier in (("peft", "sks"), ("kohya", "zwx"), ("toolkit", "qrv")):
        ws.import_concept(tmp_path / f"{fmt}.safetensors", name=f"any-{fmt}", class_word="dog", identifier=identifier)
        tensors, meta = ws.registry.load(f"any-{fmt}")
        assert set(meta.layers) == set(deltas), fmt
        for key, delta in deltas.items():
            torch.testing.assert_close(tensors[f"{key}.up"] @ tensors[f"{key}.down"], delta.flatten(1), atol=1e-6, rtol=1e-5)
    calls = []
    hook = kpipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        result = ws.generate("a <any-peft> dog and a <any-kohya> dog", [], lag=True, steps=3, height=SIZE, width=SIZE)
    finally:
        hook.remove()
    assert len(calls) == 2 * 3 and result.images[0].size == (SIZE, SIZE)
