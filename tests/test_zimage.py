"""Z-Image: residuals on each main layer's attention to_out.0, flow-matching training as the pipeline
calls the transformer, LAG on its image-first joint attention with chat-templated token positions,
and Z-Image LoRA files, on a tiny Z-Image pipeline built in code and loaded from disk the way
Tongyi-MAI/Z-Image-Turbo is (`persres.testing.zimage`)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persres import families, residuals
from persres.config import SampleConfig
from persres.errors import IncompatiblePack
from persres.families.zimage import SEQ_MULTI_OF, ZIMAGE_RANK_RATIO
from persres.sample import concept_tokens, generate
from persres.testing import SD14_UNET_CONFIG, above_lower_median, concept_shares, linear_delta
from persres.testing.zimage import ZIMAGE_TURBO_TRANSFORMER_CONFIG
from persres.tokens import BoundConcept

SIZE = 24  # px: a 6 x 6 grid of 2x2-patch image tokens on the tiny model (VAE factor 2), padded to 64 before the text
# past 32 templated tokens, where the unconditional prompt's padded length ends: its keys are masked under guidance
LONG = " with a green circle and a blue square and a yellow star and a white heart and a black cross at the left"


@pytest.fixture
def zpipe(tiny_zimage):
    from persres.models import load_pipeline

    return load_pipeline(str(tiny_zimage), dtype=torch.float32)


def add_random_concept(model, name: str, seed: int = 0, scale: float = 4.0) -> None:
    residuals.new_concept(model, name, residuals.ranks_for(model, rank=4), init="random", seed=seed)
    for layer in residuals.layers_of(model).values():  # large enough that a wrong mask cannot hide in rounding
        layer.residuals[name].up.data.mul_(scale)


def test_z_image_turbo_residuals_keep_the_papers_share_of_the_model():
    """Z-Image-Turbo's real config on the meta device: 30 main layers, attention to_out.0 3840 -> 3840,
    rank 38 by the family's rule, 8,755,200 parameters: the paper's share of SD v1.4's UNet."""
    from diffusers import UNet2DConditionModel, ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**ZIMAGE_TURBO_TRANSFORMER_CONFIG)
        sd = UNet2DConditionModel(**SD14_UNET_CONFIG)
    assert families.of(type("P", (), {"transformer": model})()).key == "zimage"
    ranks = residuals.ranks_for(model, ZIMAGE_RANK_RATIO)
    channels = residuals.block_channels(model)
    assert len(ranks) == 30 and set(ranks.values()) == {38} and set(channels.values()) == {3840}
    assert residuals.block_in_channels(model) == {}
    count = residuals.parameter_count(ranks, channels, {})
    factors = residuals.new_concept(model, "c", ranks)
    assert sum(p.numel() for f in factors.values() for p in f.parameters()) == count == 8_755_200
    assert isinstance(model.layers[0].attention.to_out[0], residuals.ResidualProjOut)
    share = count / (sum(p.numel() for p in model.parameters()) - count)
    sd_share = 1_239_040 / sum(p.numel() for p in sd.parameters())
    assert abs(share - sd_share) / sd_share < 0.05, (share, sd_share)


def test_the_family_is_read_from_the_files_and_its_turbo_defaults_apply(tiny_zimage):
    from persres.models import family_of_model
    from persres.workspace import Workspace

    assert family_of_model(str(tiny_zimage)).key == "zimage"
    ws = Workspace(str(tiny_zimage))
    assert ws.train_config().rank_ratio == ZIMAGE_RANK_RATIO
    config = ws.sample_config()
    assert (config.guidance, config.steps) == (0.0, 8)  # Z-Image-Turbo: few steps, no guidance


def test_token_positions_are_read_inside_the_chat_template(zpipe):
    """The identifier's and class word's positions index the templated sequence the text encoder reads,
    and the conditioning holds exactly that sequence's tokens (padding dropped)."""
    family = families.of(zpipe)
    prompt = "a photo of a sks dog"
    [tokens] = concept_tokens(family.region_tokenizer(zpipe), prompt, [BoundConcept("a", "sks", "dog")])
    framed = zpipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
    ids = zpipe.tokenizer(framed).input_ids
    assert ids.index(zpipe.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 0  # the frame comes first
    identifier = [p for p in tokens.positions if p not in tokens.class_positions]
    assert [ids[p] for p in identifier] == zpipe.tokenizer(" sks", add_special_tokens=False).input_ids
    assert [ids[p] for p in tokens.class_positions] == zpipe.tokenizer(" dog", add_special_tokens=False).input_ids
    assert identifier[0] > len(zpipe.tokenizer("a photo of a").input_ids)  # offset by the template's prefix
    condition = family.encode(zpipe, prompt, (SIZE, SIZE))
    assert condition.embedding.shape[:2] == (1, len(ids))


def test_the_objective_is_the_pipelines_flow_on_the_latents(zpipe, concept_dir):
    """What the transformer is given and asked for, recomputed from the same draws: x_σ = (1 - σ) x0 + σ ε
    at timestep 1 - σ, σ shifted as the scheduler shifts its sigmas; loss = mean((prediction - (x0 - ε))²)."""
    from persres.families import zimage
    from persres.families.flux import shifted_sigmas
    from persres.images import read_folder
    from persres.train import cache_inputs

    images = [r.image for r in read_folder(concept_dir)]
    source = cache_inputs(zpipe, images, "a photo of a sks dog", SIZE, flip=True)
    loss_of = zimage.flow_objective(zpipe, source, batch_size=3)
    seen = {}
    hook = zpipe.transformer.register_forward_hook(lambda m, args, out: seen.update(args=args, pred=out[0]))
    try:
        loss = loss_of(torch.Generator().manual_seed(5))
    finally:
        hook.remove()
    gen = torch.Generator().manual_seed(5)
    batch = source.sample(3, gen)
    noise = torch.randn(batch.latents.shape, generator=gen)
    sigma = shifted_sigmas(zpipe.scheduler, torch.rand((3,), generator=gen), None)
    x, t, text = seen["args"]
    expected_x = (1 - sigma.view(-1, 1, 1, 1)) * batch.latents + sigma.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(torch.stack(x).squeeze(2), expected_x)
    torch.testing.assert_close(t, 1 - sigma)
    assert all(torch.equal(e, source.condition.embedding[0]) for e in text)
    target = batch.latents - noise
    torch.testing.assert_close(loss, ((torch.stack(seen["pred"]).squeeze(2) - target) ** 2).mean())


def test_training_sigmas_are_the_pipelines_own_shifted_sigmas(zpipe):
    from persres.families.flux import image_shift, shifted_sigmas
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    scheduler = zpipe.scheduler
    assert image_shift(scheduler, 64) is None  # Z-Image-Turbo shifts by a fixed 3.0
    grid = get_default_z_image_sigmas(8)
    scheduler.set_timesteps(sigmas=grid, mu=0.7)  # as the pipeline sets them (its mu is ignored)
    torch.testing.assert_close(shifted_sigmas(scheduler, torch.tensor(grid, dtype=torch.float32), None), scheduler.sigmas[:-1])


# --- LAG on joint attention ----------------------------------------------------------------------

def rotate(x, freqs):
    turned = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2).to(torch.complex128)
    return torch.view_as_real(turned).flatten(3)


def independent_map(attn, hidden, mask, freqs, positions, image_tokens: int) -> torch.Tensor:
    """(B, N): each image query's attention to the concept's text columns (offset past the padded image
    tokens), from the module's own weights and the full softmax over each row's unpadded keys."""
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (attn.heads, -1)))  # (B, L, heads, d)
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (attn.heads, -1)))
    q, k = rotate(q, freqs).transpose(1, 2), rotate(k, freqs).transpose(1, 2)  # (B, heads, L, d)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    start = image_tokens + (-image_tokens) % SEQ_MULTI_OF
    return probs[..., [start + p for p in positions]].sum(-1).mean(1)[:, :image_tokens]  # (B, N)


@pytest.mark.parametrize("strength,guidance,backend", [(1.0, 0.0, None), (0.6, 3.0, "reference")])
def test_lag_on_joint_attention_is_the_paper_rule_recomputed_independently(zpipe, strength, guidance, backend):
    """Every main layer, every step: to_out.0 gives W x + s * M ⊙ ΔW x on the image tokens and W x on the
    padding and text tokens, M the median-binarized map recomputed here from the conditional rows
    (under guidance the batch is [conditional, unconditional], prompts of different lengths, masked);
    one transformer call a step."""
    model = zpipe.transformer
    add_random_concept(model, "a")
    concept = BoundConcept("a", "sks", "dog", strength)
    prompt = "a sks dog on a red background"
    if guidance:
        prompt += LONG
    [tokens] = concept_tokens(families.of(zpipe).region_tokenizer(zpipe), prompt, [concept])
    image_tokens = (SIZE // zpipe.vae_scale_factor // 2) ** 2
    maps, checked, calls, masked = {}, [], [], []
    hooks = [model.register_forward_pre_hook(lambda *a: calls.append(1))]
    for i, layer in enumerate(model.layers):
        def record(module, args, kwargs, name=f"layers.{i}"):  # before the attention: its to_out.0 runs inside it
            mask = kwargs.get("attention_mask")
            masked.append(mask is not None)
            maps[name] = independent_map(module, args[0], mask, kwargs["freqs_cis"], tokens.positions, image_tokens)
        hooks.append(layer.attention.register_forward_pre_hook(record, with_kwargs=True))
    for name, layer in residuals.layers_of(model).items():
        def check(module, args, output, name=name):
            x = args[0]  # (B, L, m)
            found = maps.pop(name)
            mask = above_lower_median(found[: x.shape[0] // (2 if guidance else 1)])  # the conditional rows come first
            mask = mask.repeat(x.shape[0] // mask.shape[0], 1)  # (B, N)
            expected = module.base_layer(x).double()
            expected[:, :image_tokens] += strength * mask.unsqueeze(-1) * linear_delta(module, "a", x[:, :image_tokens])
            torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)
            assert 0 < mask.mean().item() < 1
            checked.append(name)
        hooks.append(layer.register_forward_hook(check))
    try:
        result = generate(zpipe, prompt, [concept], SampleConfig(steps=3, lag=True, height=SIZE, width=SIZE, guidance=guidance),
                          backend=backend)
    finally:
        for h in hooks:
            h.remove()
    blocks = set(residuals.layers_of(model))
    assert len(checked) == 3 * len(blocks) and set(checked) == blocks
    assert len(calls) == 3  # no extra transformer evaluation
    assert any(masked) == bool(guidance)  # the two prompts' padded lengths differ: the keys are masked
    assert result.images[0].size == (SIZE, SIZE)


def test_lag_attention_is_the_pipelines_own_where_no_residual_acts(zpipe):
    """With the concept at strength 0, LAG's attention (each prompt length over its own keys, the fused
    kernel) draws what the pipeline's masked attention draws, under guidance with prompts of different lengths."""
    model = zpipe.transformer
    add_random_concept(model, "a")
    prompt = "a sks dog" + LONG
    config = SampleConfig(steps=3, height=SIZE, width=SIZE, guidance=3.0)
    with residuals.use_concepts(model, [], merged=True):
        base = generate(zpipe, prompt, [], config).images[0]
    lag = generate(zpipe, prompt, [BoundConcept("a", "sks", "dog", 0.0)], config.replace(lag=True)).images[0]
    assert np.abs(np.asarray(base).astype(int) - np.asarray(lag).astype(int)).max() <= 1


def test_two_concepts_act_in_disjoint_regions_of_the_image_tokens_only(zpipe):
    model = zpipe.transformer
    names = ["a", "b"]
    for seed, name in enumerate(names):
        add_random_concept(model, name, seed=seed)
    concepts = [BoundConcept("a", "sks", "dog"), BoundConcept("b", "zwx", "cat")]
    steps, acted, calls, seen = 5, {n: 0.0 for n in names}, [], []
    image_tokens = (SIZE // zpipe.vae_scale_factor // 2) ** 2

    def check(module, args, output):
        x = args[0]
        added = output.double() - module.base_layer(x).double()  # (B, L, m)
        assert added[:, image_tokens:].abs().max() < 1e-5  # never on the padding or the text tokens
        deltas = torch.stack([linear_delta(module, n, x) for n in names])[:, :, :image_tokens]  # (K, B, N, m)
        shares, error = concept_shares(added[:, :image_tokens], deltas, channel_dim=-1)
        assert error < 1e-4  # each image token: nothing, or exactly one concept's ΔW x
        for name, share in zip(names, shares):
            assert share <= 0.5 + 1.0 / image_tokens
            acted[name] = max(acted[name], share)
        seen.append(1)

    hooks = [layer.register_forward_hook(check) for layer in residuals.layers_of(model).values()]
    hooks.append(model.register_forward_pre_hook(lambda *a: calls.append(1)))
    try:
        result = generate(zpipe, "a sks dog and a zwx cat", concepts,
                          SampleConfig(steps=steps, lag=True, height=SIZE, width=SIZE, guidance=2.0, save_masks=True))
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
def two_zimage_concepts(tiny_zimage, concept_dir, second_concept_dir):
    for name, folder, word in (("x", concept_dir, "dog"), ("y", second_concept_dir, "cat")):
        result = cli("train", folder, "--name", name, "--class", word, "--model", tiny_zimage, *FAST)
        assert result.exit_code == 0, result.output
    return tiny_zimage


def test_train_list_gen_with_lag_and_exports_that_diffusers_fuses_on_the_trained_layers(two_zimage_concepts, tmp_path):
    """persres train -> list shows Z-Image -> gen "a V1 ... and a V2 ..." --lag -> kohya and diffusers exports
    that ZImagePipeline's own LoRA loader fuses as W + A B on exactly the trained layers; importing either
    back draws the same pixels."""
    from PIL import Image

    from persres.models import load_pipeline
    from persres.workspace import Workspace

    listed = cli("list")
    assert listed.exit_code == 0 and listed.output.count("Z-Image") == 2, listed.output
    out = tmp_path / "out"
    result = cli("gen", "a V1 dog and a V2 cat", "-c", "x", "-c", "y", "--lag", "--model", two_zimage_concepts,
                 "--height", SIZE, "--width", SIZE, "--precision", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    [png] = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (SIZE, SIZE) and float(image.text["guidance"]) == 0 and image.text["steps"] == "8"

    ws = Workspace(str(two_zimage_concepts), precision="fp32")
    tensors, meta = ws.registry.load("x")
    original = ws.generate("a V* dog", ["x"], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
    for fmt, key in (("kohya", "lora_unet_layers_0_attention_to_out_0.lora_down.weight"),
                     ("diffusers", "transformer.layers.0.attention.to_out.0.lora_A.weight")):
        path = ws.export("x", tmp_path / f"x-{fmt}.safetensors", fmt)
        pipe = load_pipeline(str(two_zimage_concepts), dtype=torch.float32)
        before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        after = pipe.transformer.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"{b}.attention.to_out.0.weight" for b in meta.ranks}, (fmt, changed)
        for b in meta.ranks:
            torch.testing.assert_close(after[f"{b}.attention.to_out.0.weight"],
                                       before[f"{b}.attention.to_out.0.weight"] + tensors[f"{b}.up"] @ tensors[f"{b}.down"])
        record = ws.import_concept(path, name=f"x-{fmt}", class_word="dog", identifier=meta.identifier)
        again = ws.generate(f"a <{record.name}> dog", [], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
        assert np.array_equal(np.asarray(again), np.asarray(original)), fmt


def test_packs_of_other_families_are_refused_both_ways(two_zimage_concepts, tiny_model, concept_dir, tmp_path):
    sd = cli("train", concept_dir, "--name", "sdpack", "--class", "circle", "--model", tiny_model, "--steps", 2,
             "--precision", "fp32")
    assert sd.exit_code == 0, sd.output
    for concept, model, words in (("sdpack", two_zimage_concepts, ("SD 1.x", "Z-Image")), ("x", tiny_model, ("Z-Image", "SD 1.x"))):
        result = cli("gen", "a V* thing", "-c", concept, "--model", model, "--steps", 2, "--height", SIZE, "--width", SIZE,
                     "--precision", "fp32", "--out", tmp_path / "o")
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
    with pytest.raises(IncompatiblePack):
        from persres.workspace import Workspace

        Workspace(str(tiny_model)).apply_concepts(["x"])


def test_class_word_suggestion_says_to_give_the_class_on_z_image(tiny_zimage, concept_dir):
    result = cli("train", concept_dir, "--name", "z", "--model", tiny_zimage, *FAST)
    assert result.exit_code == 1 and "--class" in result.output and "Z-Image" in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error")] == [result.output.strip().splitlines()[-1]]


def test_an_original_layout_single_file_draws_what_the_directory_draws(two_zimage_concepts, tmp_path):
    """The transformer in the layout ComfyUI keeps it (q/k/v fused, `attention.out`), with --config for the
    rest: detected as Z-Image by its tensor names, converted by diffusers to the same weights, the same pixels."""
    from persres.models import load_pipeline, single_file_family
    from persres.testing.zimage import save_original_layout
    from persres.workspace import Workspace

    pipe = load_pipeline(str(two_zimage_concepts), dtype=torch.float32)
    path = save_original_layout(pipe.transformer, tmp_path / "z_image_tiny.safetensors")
    assert single_file_family(str(path)).key == "zimage"
    converted = load_pipeline(str(path), dtype=torch.float32, config=str(two_zimage_concepts)).transformer.state_dict()
    assert all(torch.equal(converted[k], v) for k, v in pipe.transformer.state_dict().items())
    images = []
    for model, config in ((str(two_zimage_concepts), None), (str(path), str(two_zimage_concepts))):
        ws = Workspace(model, precision="fp32", model_config=config)
        images.append(np.asarray(ws.generate("a V* dog", ["x"], lag=True, steps=2, height=SIZE, width=SIZE).images[0]))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1  # the same weights; fp32 summation order aside


def test_the_web_app_trains_and_generates_on_z_image(tiny_zimage, concept_dir, tmp_path):
    """`persres ui` on a Z-Image model at its API: train, generate with LAG and its region overlay at Turbo's
    guidance 0, and a class suggestion refused with the one line that asks for the class."""
    import socket

    import gradio_client

    from persres.ui.app import serve
    from persres.workspace import Workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = Workspace(str(tiny_zimage), precision="fp32")
    app, url = serve(ws, tmp_path / "out", port=port, block=False)
    try:
        client = gradio_client.Client(url, verbose=False)
        images = [gradio_client.handle_file(str(p)) for p in sorted(concept_dir.iterdir())]
        said = client.predict(images, "", "zx", "dog", 3, 1e-3, ZIMAGE_RANK_RATIO, api_name="/train")
        assert said.startswith("trained zx") and ws.registry.get("zx").meta.family == "zimage"
        gallery, regions = client.predict("a V* dog", ["zx"], True, 2, 0.0, 3, 1, f"{SIZE}x{SIZE}", ["zx"], api_name="/generate")
        assert len(gallery) == 2 and "zx:" in regions  # the image and its region overlay
        with pytest.raises(Exception, match="Z-Image give the class word"):
            client.predict(images, "", api_name="/suggest")
    finally:
        app.close()


def test_train_many_trains_z_image_rows(tiny_zimage, concept_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"images,name,class,steps\n{concept_dir},zm,dog,2\n")
    result = cli("train-many", manifest, "--model", tiny_zimage, "--device", "cpu")
    assert result.exit_code == 0, result.output
    from persres.registry import Registry

    assert Registry().get("zm").meta.family == "zimage"


def test_any_z_image_lora_imports_every_layer_and_samples_under_lag(zpipe, tmp_path):
    """A LoRA of every transformer layer, as peft/diffusers, kohya and ComfyUI-format (`diffusion_model.`) files
    write it: persres keeps every layer with the file's ΔW, and two such LoRAs sample under LAG at one
    transformer evaluation per step."""
    from safetensors.torch import load_file, save_file

    from persres.testing.loras import random_lora
    from persres.workspace import Workspace

    deltas = random_lora(zpipe, tmp_path / "peft.safetensors", "peft", where=lambda k: k.startswith("transformer."))
    random_lora(zpipe, tmp_path / "kohya.safetensors", "kohya", where=lambda k: k.startswith("transformer."))
    peft = load_file(str(tmp_path / "peft.safetensors"))
    save_file({"diffusion_model." + k.removeprefix("transformer."): v for k, v in peft.items()}, str(tmp_path / "comfy.safetensors"))
    ws = Workspace(precision="fp32", pipe=zpipe)
    for fmt, identifier in (("peft", "sks"), ("kohya", "zwx"), ("comfy", "qrv")):
        ws.import_concept(tmp_path / f"{fmt}.safetensors", name=f"any-{fmt}", class_word="dog", identifier=identifier)
        tensors, meta = ws.registry.load(f"any-{fmt}")
        assert set(meta.layers) == set(deltas), fmt
        for key, delta in deltas.items():
            torch.testing.assert_close(tensors[f"{key}.up"] @ tensors[f"{key}.down"], delta.flatten(1), atol=1e-6, rtol=1e-5)
    calls = []
    hook = zpipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        result = ws.generate("a <any-peft> dog and a <any-kohya> dog", [], lag=True, steps=3, height=SIZE, width=SIZE)
    finally:
        hook.remove()
    assert len(calls) == 3 and result.images[0].size == (SIZE, SIZE)


def test_an_attention_backend_without_lag_is_refused_on_z_image_not_ignored(zpipe):
    from persres.errors import InputError

    with pytest.raises(InputError, match="Z-Image's attention with --lag only"):
        generate(zpipe, "a red circle", [], SampleConfig(steps=1, height=SIZE, width=SIZE), backend="reference")
    assert generate(zpipe, "a red circle", [], SampleConfig(steps=1, height=SIZE, width=SIZE), backend="auto").images
