"""Qwen-Image: residuals on each block's image-stream attention to_out.0, flow-matching training as the
pipeline calls the transformer, LAG on its [text, image] joint attention with token positions inside the
system-message template (its prefix dropped), true CFG as two evaluations a step, and Qwen-Image LoRA
files, on a tiny Qwen-Image pipeline built in code and loaded from disk the way Qwen/Qwen-Image is
(`persres.testing.qwenimage`)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persres import families, residuals
from persres.config import SampleConfig
from persres.errors import IncompatiblePack
from persres.families.qwenimage import QWEN_RANK_RATIO
from persres.sample import concept_tokens, generate
from persres.testing import SD14_UNET_CONFIG, above_lower_median, concept_shares, linear_delta
from persres.testing.qwenimage import QWEN_IMAGE_SCHEDULER_CONFIG, QWEN_IMAGE_TRANSFORMER_CONFIG
from persres.tokens import BoundConcept

SIZE = 24  # px: a 6 x 6 grid of 2x2-patch image tokens on the tiny model (VAE factor 2)


@pytest.fixture
def qpipe(tiny_qwenimage):
    from persres.models import load_pipeline

    return load_pipeline(str(tiny_qwenimage), dtype=torch.float32)


def add_random_concept(model, name: str, seed: int = 0, scale: float = 4.0) -> None:
    residuals.new_concept(model, name, residuals.ranks_for(model, rank=4), init="random", seed=seed)
    for layer in residuals.layers_of(model).values():  # large enough that a wrong mask cannot hide in rounding
        layer.residuals[name].up.data.mul_(scale)


def test_qwen_image_residuals_keep_the_papers_share_of_the_model():
    """Qwen-Image's real config on the meta device: 60 blocks, attention to_out.0 3072 -> 3072, rank 80 by the
    family's rule, 29,491,200 parameters: the paper's share of SD v1.4's UNet."""
    from diffusers import QwenImageTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER_CONFIG)
        sd = UNet2DConditionModel(**SD14_UNET_CONFIG)
    assert families.of(type("P", (), {"transformer": model})()).key == "qwenimage"
    ranks = residuals.ranks_for(model, QWEN_RANK_RATIO)
    channels = residuals.block_channels(model)
    assert len(ranks) == 60 and set(ranks.values()) == {80} and set(channels.values()) == {3072}
    count = residuals.parameter_count(ranks, channels, {})
    factors = residuals.new_concept(model, "c", ranks)
    assert sum(p.numel() for f in factors.values() for p in f.parameters()) == count == 29_491_200
    assert isinstance(model.transformer_blocks[0].attn.to_out[0], residuals.ResidualProjOut)
    share = count / (sum(p.numel() for p in model.parameters()) - count)
    sd_share = 1_239_040 / sum(p.numel() for p in sd.parameters())
    assert abs(share - sd_share) / sd_share < 0.05, (share, sd_share)


def test_the_family_is_read_from_the_files_and_its_defaults_apply(tiny_qwenimage):
    from persres.models import family_of_model
    from persres.workspace import Workspace

    assert family_of_model(str(tiny_qwenimage)).key == "qwenimage"
    ws = Workspace(str(tiny_qwenimage))
    assert ws.train_config().rank_ratio == QWEN_RANK_RATIO
    config = ws.sample_config()
    assert (config.guidance, config.steps) == (4.0, 50)  # QwenImagePipeline's true_cfg_scale and steps


def test_token_positions_are_read_inside_the_template_after_its_dropped_prefix(qpipe):
    """Positions index the sequence the transformer reads: the templated prompt with the pipeline's first
    `prompt_template_encode_start_idx` tokens (the system message) dropped; the conditioning holds exactly it."""
    family = families.of(qpipe)
    prompt = "a photo of a sks dog"
    [tokens] = concept_tokens(family.region_tokenizer(qpipe), prompt, [BoundConcept("a", "sks", "dog")])
    template, drop = qpipe.prompt_template_encode, qpipe.prompt_template_encode_start_idx
    assert len(qpipe.tokenizer(template.split("{}")[0]).input_ids) == drop == 34  # the frame's prefix, as the real tokenizer's
    ids = qpipe.tokenizer(template.format(prompt)).input_ids[drop:]
    identifier = [p for p in tokens.positions if p not in tokens.class_positions]
    assert [ids[p] for p in identifier] == qpipe.tokenizer(" sks", add_special_tokens=False).input_ids
    assert [ids[p] for p in tokens.class_positions] == qpipe.tokenizer(" dog", add_special_tokens=False).input_ids
    assert identifier == [4]  # "a photo of a" before it, nothing of the system message
    condition = family.encode(qpipe, prompt, (SIZE, SIZE))
    assert condition.embedding.shape[:2] == (1, len(ids))


def test_the_objective_is_the_pipelines_flow_on_normalized_packed_latents(qpipe, concept_dir):
    """What the transformer is given and asked for, recomputed from the same draws: latents (z - mean) / std per
    channel, packed 2x2; x_σ = (1 - σ) x0 + σ ε at timestep σ, σ shifted for the image's token count;
    loss = mean((prediction - (ε - x0))²)."""
    from persres.families.flux import image_shift, shifted_sigmas
    from persres.images import read_folder, to_tensor
    from persres.train import cache_inputs, center_square

    images = [r.image for r in read_folder(concept_dir)]
    source = cache_inputs(qpipe, images, "a photo of a sks dog", SIZE, flip=True)
    pixels = torch.stack([to_tensor(center_square(images[0], SIZE))]).unsqueeze(2)  # (1, 3, 1, H, W): one frame
    z = qpipe.vae.encode(pixels).latent_dist.mean[:, :, 0]
    torch.testing.assert_close(source.mean[:1], z)
    loss_of = families.of(qpipe).objective(qpipe, source, type("C", (), {"batch_size": 3})())
    seen = {}
    hook = qpipe.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs=kwargs, pred=out[0]),
                                                   with_kwargs=True)
    try:
        loss = loss_of(torch.Generator().manual_seed(5))
    finally:
        hook.remove()
    gen = torch.Generator().manual_seed(5)
    batch = source.sample(3, gen)
    x0 = qpipe._pack_latents(batch.latents, 3, 4, SIZE // 2, SIZE // 2)
    noise = torch.randn(x0.shape, generator=gen)
    h = SIZE // qpipe.vae_scale_factor // 2
    sigma = shifted_sigmas(qpipe.scheduler, torch.rand((3,), generator=gen), image_shift(qpipe.scheduler, h * h))
    kwargs = seen["kwargs"]
    torch.testing.assert_close(kwargs["hidden_states"], (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise)
    torch.testing.assert_close(kwargs["timestep"], sigma)
    assert kwargs["img_shapes"] == [[(1, h, h)]] * 3
    assert torch.equal(kwargs["encoder_hidden_states"], source.condition.embedding.expand(3, -1, -1))
    torch.testing.assert_close(loss, ((seen["pred"] - (noise - x0)) ** 2).mean())


def test_the_latents_are_normalized_per_channel_as_the_pipeline_denormalizes_them(qpipe, concept_dir):
    """A drawn batch is (z - latents_mean) / latents_std per channel, z a draw of a reference's latent
    distribution: what QwenImagePipeline turns back with latents * std + mean before decoding."""
    from persres.images import read_folder
    from persres.train import cache_inputs

    source = cache_inputs(qpipe, [r.image for r in read_folder(concept_dir)], "a sks dog", SIZE, flip=False)
    batch = source.sample(2, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, source.mean.shape[0], (2,), generator=gen)
    z = source.mean[idx] + source.std[idx] * torch.randn(source.mean[idx].shape, generator=gen)  # (2, C, h, w)
    config = qpipe.vae.config
    mean, std = (torch.tensor(config[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(batch.latents, (z - mean) / std)


def test_training_sigmas_are_the_pipelines_own_shifted_sigmas(qpipe):
    """σ is shifted as QwenImagePipeline sets its schedule (μ from the image's token count), before the
    scheduler stretches its last step to `shift_terminal`."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from persres.families.flux import image_shift, shifted_sigmas

    config = {k: v for k, v in QWEN_IMAGE_SCHEDULER_CONFIG.items() if k != "shift_terminal"}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    c = scheduler.config
    mu = calculate_shift(1024, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert image_shift(scheduler, 1024) == mu
    grid = np.linspace(1.0, 1 / 8, 8)  # what the pipeline passes
    scheduler.set_timesteps(sigmas=grid, mu=mu)
    torch.testing.assert_close(shifted_sigmas(scheduler, torch.tensor(grid, dtype=torch.float32), mu), scheduler.sigmas[:-1])


# --- LAG on joint attention ----------------------------------------------------------------------

def independent_map(attn, image, text, mask, freqs, positions) -> torch.Tensor:
    """(B, N): each image query's attention to the concept's text columns, from the module's own weights and
    the full softmax over [text, image] keys, masked text keys left out."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    def heads(x, f, norm, freq):
        y = f(x).unflatten(-1, (attn.heads, -1))
        y = norm(y) if norm is not None else y
        return apply_rotary_emb_qwen(y, freq, use_real=False).double()

    q = torch.cat([heads(text, attn.add_q_proj, attn.norm_added_q, freqs[1]), heads(image, attn.to_q, attn.norm_q, freqs[0])], 1)
    k = torch.cat([heads(text, attn.add_k_proj, attn.norm_added_k, freqs[1]), heads(image, attn.to_k, attn.norm_k, freqs[0])], 1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T+N, d)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        keep = torch.cat([mask.bool(), mask.new_ones(mask.shape[0], image.shape[1]).bool()], 1)
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs[..., [p for p in positions]].sum(-1).mean(1)[:, text.shape[1]:]  # (B, N): image queries


@pytest.mark.parametrize("strength,guidance,backend", [(1.0, 1.0, None), (0.6, 3.0, "reference")])
def test_lag_on_joint_attention_is_the_paper_rule_recomputed_independently(qpipe, strength, guidance, backend):
    """Every block, every evaluation: to_out.0 (image tokens only) gives W x + s * M ⊙ ΔW x, M the median-binarized
    map recomputed here. Under true CFG each step is the pipeline's two evaluations, conditional then
    unconditional (a blank prompt): the conditional one's M comes from its own maps, the unconditional one's from
    the conditional one's maps averaged over blocks. No evaluation is added."""
    model = qpipe.transformer
    add_random_concept(model, "a")
    concept = BoundConcept("a", "sks", "dog", strength)
    prompt = "a sks dog on a red background"
    [tokens] = concept_tokens(families.of(qpipe).region_tokenizer(qpipe), prompt, [concept])
    maps, checked, calls, cond_maps = {}, [], [], {}
    hooks = [model.register_forward_pre_hook(lambda *a: calls.append(1))]
    for i, block in enumerate(model.transformer_blocks):
        def record(module, args, kwargs, name=f"transformer_blocks.{i}"):  # before the attention: its to_out.0 runs inside it
            found = independent_map(module, kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                                    kwargs["encoder_hidden_states_mask"], kwargs["image_rotary_emb"], tokens.positions)
            maps[name] = found
            if len(calls) % 2 == 1 or not guidance > 1:  # a conditional evaluation
                cond_maps[name] = found
        hooks.append(block.attn.register_forward_pre_hook(record, with_kwargs=True))
    for name, layer in residuals.layers_of(model).items():
        def check(module, args, output, name=name):
            x = args[0]  # (B, N, m): the image stream
            conditional = len(calls) % 2 == 1 or not guidance > 1
            found = maps.pop(name) if conditional else torch.stack(list(cond_maps.values())).mean(0)
            mask = above_lower_median(found)  # (B, N)
            expected = module.base_layer(x).double() + strength * mask.unsqueeze(-1) * linear_delta(module, "a", x)
            torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)
            assert 0 < mask.mean().item() < 1
            checked.append((name, conditional))
        hooks.append(layer.register_forward_hook(check))
    try:
        result = generate(qpipe, prompt, [concept], SampleConfig(steps=3, lag=True, height=SIZE, width=SIZE, guidance=guidance),
                          backend=backend)
    finally:
        for h in hooks:
            h.remove()
    blocks = set(residuals.layers_of(model))
    per_step = 2 if guidance > 1 else 1
    assert len(calls) == 3 * per_step  # the pipeline's own evaluations, none added
    assert len(checked) == 3 * per_step * len(blocks) and {n for n, _ in checked} == blocks
    assert sum(not c for _, c in checked) == (3 * len(blocks) if guidance > 1 else 0)
    assert result.images[0].size == (SIZE, SIZE)


def test_lag_attention_is_the_pipelines_own_where_no_residual_acts(qpipe):
    """With the concept at strength 0, LAG's attention (the fused kernel) draws what the pipeline's draws,
    under true CFG."""
    model = qpipe.transformer
    add_random_concept(model, "a")
    config = SampleConfig(steps=3, height=SIZE, width=SIZE, guidance=4.0)
    with residuals.use_concepts(model, [], merged=True):
        base = generate(qpipe, "a sks dog", [], config).images[0]
    lag = generate(qpipe, "a sks dog", [BoundConcept("a", "sks", "dog", 0.0)], config.replace(lag=True)).images[0]
    assert np.abs(np.asarray(base).astype(int) - np.asarray(lag).astype(int)).max() <= 1


def test_rows_with_masked_text_attend_as_the_pipelines_mask_makes_them(qpipe):
    """A batch of two prompts of different lengths, the shorter padded and masked: the processor's outputs are
    diffusers' processor's, and its maps the full masked softmax's, row by row."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    from persres.families.qwenimage_attention import QwenLagProcessor

    torch.manual_seed(0)
    block = qpipe.transformer.transformer_blocks[0]
    attn = block.attn
    n, t, dim = 16, 9, attn.inner_dim
    image, text = torch.randn(2, n, dim), torch.randn(2, t, dim)
    mask = torch.ones(2, t, dtype=torch.bool)  # what the transformer hands its blocks
    mask[1, 5:] = False  # the second prompt is 5 tokens long
    freqs = qpipe.transformer.pos_embed([[(1, 4, 4)]] * 2, max_txt_seq_len=t, device=image.device)
    positions = [2, 3]

    class Sink:
        token_sets = [positions]
        maps = None

        def record(self, block, maps):
            self.maps = maps

    sink = Sink()
    ours = QwenLagProcessor(None, sink, "b", n)(attn, image, text, mask, image_rotary_emb=freqs)
    theirs = QwenDoubleStreamAttnProcessor2_0()(attn, image, text, mask, image_rotary_emb=freqs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    expected = independent_map(attn, image, text, mask, freqs, positions)
    torch.testing.assert_close(sink.maps[:, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_two_concepts_act_in_disjoint_regions_of_the_image_tokens(qpipe):
    model = qpipe.transformer
    names = ["a", "b"]
    for seed, name in enumerate(names):
        add_random_concept(model, name, seed=seed)
    concepts = [BoundConcept("a", "sks", "dog"), BoundConcept("b", "zwx", "cat")]
    steps, acted, calls, seen = 5, {n: 0.0 for n in names}, [], []
    image_tokens = (SIZE // qpipe.vae_scale_factor // 2) ** 2

    def check(module, args, output):
        x = args[0]  # (B, N, m): image tokens only
        assert x.shape[1] == image_tokens
        added = output.double() - module.base_layer(x).double()
        deltas = torch.stack([linear_delta(module, n, x) for n in names])  # (K, B, N, m)
        shares, error = concept_shares(added, deltas, channel_dim=-1)
        assert error < 1e-4  # each image token: nothing, or exactly one concept's ΔW x
        for name, share in zip(names, shares):
            assert share <= 0.5 + 1.0 / image_tokens
            acted[name] = max(acted[name], share)
        seen.append(1)

    hooks = [layer.register_forward_hook(check) for layer in residuals.layers_of(model).values()]
    hooks.append(model.register_forward_pre_hook(lambda *a: calls.append(1)))
    try:
        result = generate(qpipe, "a sks dog and a zwx cat", concepts,
                          SampleConfig(steps=steps, lag=True, height=SIZE, width=SIZE, guidance=4.0, save_masks=True))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 2 * steps  # true CFG: the pipeline's conditional and unconditional evaluation a step
    assert seen and all(share > 0 for share in acted.values()), acted
    assert set(result.masks) == {"a", "b"}


# --- the CLI, packs and LoRA files ---------------------------------------------------------------

runner = CliRunner()


def cli(*args):
    from persres.cli import app

    return runner.invoke(app, [str(a) for a in args])


FAST = ("--steps", 4, "--resolution", SIZE, "--precision", "fp32")


@pytest.fixture
def two_qwen_concepts(tiny_qwenimage, concept_dir, second_concept_dir):
    for name, folder, word in (("x", concept_dir, "dog"), ("y", second_concept_dir, "cat")):
        result = cli("train", folder, "--name", name, "--class", word, "--model", tiny_qwenimage, *FAST)
        assert result.exit_code == 0, result.output
    return tiny_qwenimage


def test_train_list_gen_with_lag_and_exports_that_diffusers_fuses_on_the_trained_layers(two_qwen_concepts, tmp_path):
    """persres train -> list shows Qwen-Image -> gen "a V1 ... and a V2 ..." --lag -> kohya and diffusers exports
    that QwenImagePipeline's own LoRA loader fuses as W + A B on exactly the trained layers; importing either
    back draws the same pixels."""
    from PIL import Image

    from persres.models import load_pipeline
    from persres.workspace import Workspace

    listed = cli("list")
    assert listed.exit_code == 0 and listed.output.count("Qwen-Image") == 2, listed.output
    out = tmp_path / "out"
    result = cli("gen", "a V1 dog and a V2 cat", "-c", "x", "-c", "y", "--lag", "--model", two_qwen_concepts, "--steps", 3,
                 "--height", SIZE, "--width", SIZE, "--precision", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    [png] = out.glob("*.png")
    image = Image.open(png)
    assert image.size == (SIZE, SIZE) and float(image.text["guidance"]) == 4.0

    ws = Workspace(str(two_qwen_concepts), precision="fp32")
    tensors, meta = ws.registry.load("x")
    original = ws.generate("a V* dog", ["x"], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
    for fmt, key in (("kohya", "lora_unet_transformer_blocks_0_attn_to_out_0.lora_down.weight"),
                     ("diffusers", "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight")):
        path = ws.export("x", tmp_path / f"x-{fmt}.safetensors", fmt)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert key in f.keys(), (fmt, sorted(f.keys())[:4])
        pipe = load_pipeline(str(two_qwen_concepts), dtype=torch.float32)
        before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        after = pipe.transformer.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"{b}.attn.to_out.0.weight" for b in meta.ranks}, (fmt, changed)
        for b in meta.ranks:
            torch.testing.assert_close(after[f"{b}.attn.to_out.0.weight"],
                                       before[f"{b}.attn.to_out.0.weight"] + tensors[f"{b}.up"] @ tensors[f"{b}.down"])
        record = ws.import_concept(path, name=f"x-{fmt}", class_word="dog", identifier=meta.identifier)
        again = ws.generate(f"a <{record.name}> dog", [], lag=True, steps=3, height=SIZE, width=SIZE).images[0]
        assert np.array_equal(np.asarray(again), np.asarray(original)), fmt


def test_packs_of_other_families_are_refused_both_ways(two_qwen_concepts, tiny_zimage, concept_dir, tmp_path):
    z = cli("train", concept_dir, "--name", "zpack", "--class", "dog", "--model", tiny_zimage, *FAST)
    assert z.exit_code == 0, z.output
    for concept, model, words in (("zpack", two_qwen_concepts, ("Z-Image", "Qwen-Image")), ("x", tiny_zimage, ("Qwen-Image", "Z-Image"))):
        result = cli("gen", "a V* dog", "-c", concept, "--model", model, "--steps", 2, "--height", SIZE, "--width", SIZE,
                     "--precision", "fp32", "--out", tmp_path / "o")
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
    with pytest.raises(IncompatiblePack):
        from persres.workspace import Workspace

        Workspace(str(tiny_zimage)).apply_concepts(["x"])


def test_class_word_suggestion_says_to_give_the_class_on_qwen_image(tiny_qwenimage, concept_dir):
    result = cli("train", concept_dir, "--name", "q", "--model", tiny_qwenimage, *FAST)
    assert result.exit_code == 1 and "--class" in result.output and "Qwen-Image" in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error")] == [result.output.strip().splitlines()[-1]]


def test_a_single_file_transformer_draws_what_the_directory_draws(two_qwen_concepts, tmp_path):
    """The transformer as one .safetensors file, as ComfyUI keeps it (diffusers' names), with --config for the
    rest: detected as Qwen-Image by its tensor names, the same weights, the same pixels."""
    from safetensors.torch import save_file

    from persres.models import load_pipeline, single_file_family
    from persres.workspace import Workspace

    pipe = load_pipeline(str(two_qwen_concepts), dtype=torch.float32)
    path = tmp_path / "qwen_image_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(path))
    assert single_file_family(str(path)).key == "qwenimage"
    converted = load_pipeline(str(path), dtype=torch.float32, config=str(two_qwen_concepts)).transformer.state_dict()
    assert all(torch.equal(converted[k], v) for k, v in pipe.transformer.state_dict().items())
    images = []
    for model, config in ((str(two_qwen_concepts), None), (str(path), str(two_qwen_concepts))):
        ws = Workspace(model, precision="fp32", model_config=config)
        images.append(np.asarray(ws.generate("a V* dog", ["x"], lag=True, steps=2, height=SIZE, width=SIZE).images[0]))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


def test_the_web_app_trains_and_generates_on_qwen_image(tiny_qwenimage, concept_dir, tmp_path):
    """`persres ui` on a Qwen-Image model at its API: train, generate with LAG and its region overlay under true
    CFG, and a class suggestion refused with the one line that asks for the class."""
    import socket

    import gradio_client

    from persres.ui.app import serve
    from persres.workspace import Workspace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = Workspace(str(tiny_qwenimage), precision="fp32")
    app, url = serve(ws, tmp_path / "out", port=port, block=False)
    try:
        client = gradio_client.Client(url, verbose=False)
        images = [gradio_client.handle_file(str(p)) for p in sorted(concept_dir.iterdir())]
        said = client.predict(images, "", "qx", "dog", 3, 1e-3, QWEN_RANK_RATIO, api_name="/train")
        assert said.startswith("trained qx") and ws.registry.get("qx").meta.family == "qwenimage"
        gallery, regions = client.predict("a V* dog", ["qx"], True, 2, 4.0, 3, 1, f"{SIZE}x{SIZE}", ["qx"], api_name="/generate")
        assert len(gallery) == 2 and "qx:" in regions  # the image and its region overlay
        with pytest.raises(Exception, match="Qwen-Image give the class word"):
            client.predict(images, "", api_name="/suggest")
    finally:
        app.close()


def test_train_many_trains_qwen_image_rows(tiny_qwenimage, concept_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"images,name,class,steps\n{concept_dir},qm,dog,2\n")
    result = cli("train-many", manifest, "--model", tiny_qwenimage, "--device", "cpu")
    assert result.exit_code == 0, result.output
    from persres.registry import Registry

    assert Registry().get("qm").meta.family == "qwenimage"


def test_any_qwen_image_lora_imports_every_layer_and_samples_under_lag(qpipe, tmp_path):
    """A LoRA of every transformer layer, as peft/diffusers, kohya (musubi-tuner) and ComfyUI-format
    (`diffusion_model.`) files write it: persres keeps every layer with the file's ΔW, and two such LoRAs sample
    under LAG with the pipeline's two evaluations a step."""
    from safetensors.torch import load_file, save_file

    from persres.testing.loras import random_lora
    from persres.workspace import Workspace

    deltas = random_lora(qpipe, tmp_path / "peft.safetensors", "peft", where=lambda k: k.startswith("transformer."))
    random_lora(qpipe, tmp_path / "kohya.safetensors", "kohya", where=lambda k: k.startswith("transformer."))
    peft = load_file(str(tmp_path / "peft.safetensors"))
    save_file({"diffusion_model." + k.removeprefix("transformer."): v for k, v in peft.items()}, str(tmp_path / "comfy.safetensors"))
    ws = Workspace(precision="fp32", pipe=qpipe)
    for fmt, identifier in (("peft", "sks"), ("kohya", "zwx"), ("comfy", "qrv")):
        ws.import_concept(tmp_path / f"{fmt}.safetensors", name=f"any-{fmt}", class_word="dog", identifier=identifier)
        tensors, meta = ws.registry.load(f"any-{fmt}")
        assert set(meta.layers) == set(deltas), fmt
        for key, delta in deltas.items():
            torch.testing.assert_close(tensors[f"{key}.up"] @ tensors[f"{key}.down"], delta.flatten(1), atol=1e-6, rtol=1e-5)
    calls = []
    hook = qpipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        result = ws.generate("a <any-peft> dog and a <any-kohya> dog", [], lag=True, steps=3, height=SIZE, width=SIZE)
    finally:
        hook.remove()
    assert len(calls) == 2 * 3 and result.images[0].size == (SIZE, SIZE)


def test_an_attention_backend_without_lag_is_refused_on_qwen_image_not_ignored(qpipe):
    from persres.errors import InputError

    with pytest.raises(InputError, match="Qwen-Image's attention with --lag only"):
        generate(qpipe, "a red circle", [], SampleConfig(steps=1, height=SIZE, width=SIZE), backend="reference")
