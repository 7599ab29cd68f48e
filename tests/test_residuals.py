import pytest
import torch
from torch import nn

from persres import residuals
from persres.config import TrainConfig
from persres.testing import SD14_UNET_CONFIG


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=emb).sample


def randomize(unet, name):
    with torch.no_grad():
        for layer in residuals.layers_of(unet).values():
            layer.residuals[name].up.normal_(0, 0.3)


def test_sd14_architecture_has_the_papers_parameter_count():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
    ranks = residuals.ranks_for(unet)
    assert len(ranks) == 16
    assert sorted(set(ranks.values())) == [16, 32, 64]
    factors = residuals.new_concept(unet, "c", ranks)
    assert sum(p.numel() for f in factors.values() for p in f.parameters()) == 1_239_040
    assert residuals.parameter_count(ranks, residuals.block_channels(unet)) == 1_239_040


@pytest.mark.parametrize("channels,ratio,rank,expected", [(320, 0.05, None, 16), (640, 0.05, None, 32), (1280, 0.05, None, 64), (32, 0.05, None, 2), (8, 0.05, None, 1), (64, 0.05, 100, 64), (64, 0.05, 4, 4)])
def test_rank_for(channels, ratio, rank, expected):
    assert residuals.rank_for(channels, ratio, rank) == expected


def test_residuals_off_is_bit_for_bit_the_base_model(pipe):
    unet = pipe.unet
    base = unet_out(unet)
    residuals.new_concept(unet, "a", residuals.ranks_for(unet))
    randomize(unet, "a")
    with residuals.use_concepts(unet, [], merged=False):
        assert torch.equal(unet_out(unet), base)
    assert not torch.allclose(unet_out(unet), base)  # loaded concepts act by default
    residuals.remove(unet)
    assert torch.equal(unet_out(unet), base)
    assert not residuals.layers_of(unet)


@pytest.mark.parametrize("merged", [False, True])
def test_a_strength_scales_the_residual_and_ends_with_its_block(pipe, merged):
    unet = pipe.unet
    base = unet_out(unet)
    residuals.new_concept(unet, "a", residuals.ranks_for(unet))
    randomize(unet, "a")
    full = unet_out(unet)
    with residuals.use_concepts(unet, ["a"], merged=merged, strengths={"a": 0.0}):
        assert torch.equal(unet_out(unet), base)  # strength 0: the base model, bit for bit
    layer = next(iter(residuals.layers_of(unet).values()))
    x = torch.randn(2, layer.channels, 4, 4) if layer.is_conv else torch.randn(2, 16, layer.channels)
    with torch.no_grad(), residuals.use_concepts(unet, [], merged=False):
        layer_base = layer(x)
    with torch.no_grad():
        layer_full = layer(x)
        with residuals.use_concepts(unet, ["a"], merged=merged, strengths={"a": 0.4}):
            torch.testing.assert_close(layer(x), layer_base + 0.4 * (layer_full - layer_base), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(unet_out(unet), full)
    assert layer.strengths == {} and torch.equal(unet_out(unet), full)  # as it was after the block
    residuals.remove(unet)


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_linear_model"])
def test_merge_equals_unmerged_and_unmerge_is_exact(model_fixture, request):
    from persres.models import load_pipeline

    unet = load_pipeline(str(request.getfixturevalue(model_fixture))).unet
    originals = {k: v.weight.detach().clone() for k, v in residuals.transformer_blocks(unet).items() for v in [v.proj_out]}
    residuals.new_concept(unet, "a", residuals.ranks_for(unet))
    residuals.new_concept(unet, "b", residuals.ranks_for(unet), seed=1)
    randomize(unet, "a")
    randomize(unet, "b")
    unmerged = unet_out(unet)
    with residuals.use_concepts(unet, ["a", "b"], merged=True):
        assert all(layer.merged == ["a", "b"] for layer in residuals.layers_of(unet).values())
        torch.testing.assert_close(unet_out(unet), unmerged, rtol=1e-4, atol=1e-5)
    for block, layer in residuals.layers_of(unet).items():
        assert torch.equal(layer.weight, originals[block])
    expected_kind = nn.Linear if model_fixture == "tiny_linear_model" else nn.Conv2d
    assert all(isinstance(layer.base_layer, expected_kind) for layer in residuals.layers_of(unet).values())


def test_only_residual_factors_receive_gradients(pipe):
    from persres.train import cache_inputs

    unet = pipe.unet
    factors = residuals.new_concept(unet, "a", residuals.ranks_for(unet), init="random")
    for f in factors.values():
        f.requires_grad_(True)
    from PIL import Image

    source = cache_inputs(pipe, [Image.new("RGB", (16, 16), (200, 10, 10))], "a photo of a sks circle", 16, flip=False)
    batch = source.sample(2, torch.Generator().manual_seed(0))
    latents, emb = batch.latents, batch.embedding
    unet(latents, torch.tensor([1, 2]), encoder_hidden_states=emb).sample.square().mean().backward()
    trainable = {id(p) for f in factors.values() for p in f.parameters()}
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, p in model.named_parameters():
            if id(p) in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name


def test_training_lowers_the_loss_on_the_concept_images(pipe, concept_dir):
    from persres.images import read_folder
    from persres.testing import fixed_noise_loss
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    before = fixed_noise_loss(pipe, images, "a photo of a sks circle", 16)
    result = train_residuals(pipe, images, "sks", "circle", TrainConfig(steps=60, lr=1e-2))
    assert not residuals.loaded_concepts(pipe.unet)  # the pipeline is left as it was
    residuals.load_concept(pipe.unet, "c", result.tensors)
    after = fixed_noise_loss(pipe, images, "a photo of a sks circle", 16)
    assert after < before * 0.97, (before, after)
    assert result.parameter_count == sum(t.numel() for t in result.tensors.values())
    assert len(result.losses) == 60


def test_zero_init_starts_at_the_base_model(pipe):
    base = unet_out(pipe.unet)
    residuals.new_concept(pipe.unet, "z", residuals.ranks_for(pipe.unet), init="zero")
    assert torch.equal(unet_out(pipe.unet), base)
    residuals.new_concept(pipe.unet, "r", residuals.ranks_for(pipe.unet), init="random")
    assert not torch.equal(unet_out(pipe.unet), base)


def test_training_freezes_a_pipeline_handed_in_unfrozen_and_restores_it(pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import train_residuals

    pipe.unet.requires_grad_(True)
    train_residuals(pipe, [r.image for r in read_folder(concept_dir)], "sks", "circle", TrainConfig(steps=2))
    assert all(p.grad is None for p in pipe.unet.parameters())  # no backward compute spent on base weights
    assert all(p.requires_grad for p in pipe.unet.parameters())  # and the pipeline is left as it was


def test_concepts_already_loaded_do_not_shape_what_a_new_one_learns(pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    config = TrainConfig(steps=3, lr=1e-2, init="random")
    alone = train_residuals(pipe, images, "sks", "circle", config).tensors
    residuals.new_concept(pipe.unet, "other", residuals.ranks_for(pipe.unet), "random", seed=5)
    randomize(pipe.unet, "other")  # a loaded concept that changes every block's output
    beside = train_residuals(pipe, images, "sks", "circle", config).tensors
    with residuals.use_concepts(pipe.unet, ["other"], merged=True):  # or folded into the weights
        folded = train_residuals(pipe, images, "sks", "circle", config).tensors
        layer = next(iter(residuals.layers_of(pipe.unet).values()))
        assert layer.merged == ["other"] and layer.active == ("other",)  # left as it was
    for learned in (beside, folded):
        assert learned.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(learned[key], alone[key])
    assert residuals.loaded_concepts(pipe.unet) == ["other"]


def test_cosine_schedule_takes_the_same_first_step_and_smaller_later_ones(pipe, concept_dir):
    from persres.errors import InputError
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    config = TrainConfig(steps=4, lr=1e-2)
    learned = {(schedule, steps): train_residuals(pipe, images, "sks", "circle", config.replace(lr_schedule=schedule, steps=steps)).tensors
               for schedule in ("constant", "cosine") for steps in (1, 4)}

    def moved(schedule: str) -> float:  # how far steps 2-4 went from where step 1 left the factors
        first, last = learned[(schedule, 1)], learned[(schedule, 4)]
        return sum((last[k] - first[k]).norm().item() ** 2 for k in first) ** 0.5

    for k in learned[("constant", 1)]:  # step 1 runs at the full learning rate either way
        torch.testing.assert_close(learned[("cosine", 1)][k], learned[("constant", 1)][k])
    assert 0 < moved("cosine") < 0.8 * moved("constant"), (moved("cosine"), moved("constant"))  # then it decays
    with pytest.raises(InputError, match="--lr-schedule"):
        TrainConfig(lr_schedule="linear")


def test_min_snr_weights_cap_the_clean_steps_and_leave_the_noisy_ones():
    from persres.train import snr_weights

    alphas = torch.tensor([0.99, 0.9, 0.5, 0.1])  # SNR 99, 9, 1, 1/9
    t = torch.arange(4)
    snr = alphas / (1 - alphas)
    torch.testing.assert_close(snr_weights(alphas, t, "epsilon", 5.0), torch.tensor([5 / 99, 5 / 9, 1.0, 1.0]))
    torch.testing.assert_close(snr_weights(alphas, t, "v_prediction", 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_min_snr_weighting_changes_what_is_learned_only_where_it_caps(pipe, concept_dir):
    from persres.errors import InputError
    from persres.images import read_folder
    from persres.train import train_residuals

    images = [r.image for r in read_folder(concept_dir)]
    config = TrainConfig(steps=3, lr=1e-2)
    max_snr = float((pipe.scheduler.alphas_cumprod / (1 - pipe.scheduler.alphas_cumprod)).max())
    plain, uncapped, capped = (train_residuals(pipe, images, "sks", "circle", config.replace(snr_gamma=g)).tensors
                               for g in (None, 2 * max_snr, 1.0))
    for k in plain:  # a cap above every step's SNR weighs each step 1: plain MSE
        torch.testing.assert_close(uncapped[k], plain[k])
    assert any(not torch.allclose(capped[k], plain[k]) for k in plain)
    with pytest.raises(InputError, match="--snr-gamma"):
        TrainConfig(snr_gamma=0)


def test_a_sample_prediction_scheduler_is_refused(pipe, concept_dir):
    from persres.errors import InputError
    from persres.images import read_folder
    from persres.train import train_residuals

    pipe.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(InputError, match="'sample'"):
        train_residuals(pipe, [r.image for r in read_folder(concept_dir)], "sks", "circle", TrainConfig(steps=1))
    assert not residuals.layers_of(pipe.unet) or not residuals.loaded_concepts(pipe.unet)


def test_zoom_out_views_shrink_the_reference_onto_its_own_edge_pixels():
    import random

    import numpy as np
    from PIL import Image

    from persres.train import ZOOM_VIEWS, zoom_out_views

    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :] = (10, 20, 200)  # a blue border all round ...
    arr[8:24, 8:24] = (250, 250, 0)  # ... around a yellow square
    square = Image.fromarray(arr)
    views = zoom_out_views(square, 0.5, 4, random.Random(3))
    assert len(views) == ZOOM_VIEWS
    assert [b for _, b in views] == [b for _, b in zoom_out_views(square, 0.5, 4, random.Random(3))]  # seeded
    for image, (x0, y0, x1, y1) in views:
        assert image.size == (32, 32)
        assert 0 <= x0 < x1 <= 8 and 0 <= y0 < y1 <= 8 and x1 - x0 == y1 - y0  # in cells of 4 px
        assert 4 <= x1 - x0 <= 7  # scale in [0.5, 1): never the whole canvas
        px = np.asarray(image)
        outside = np.ones((32, 32), bool)
        outside[y0 * 4 : y1 * 4, x0 * 4 : x1 * 4] = False
        assert (px[outside] == (10, 20, 200)).all()  # the edge repeated: no black frame
        inside = px[y0 * 4 : y1 * 4, x0 * 4 : x1 * 4].reshape(-1, 3)
        assert (np.abs(inside.astype(int) - (250, 250, 0)).sum(-1) < 30).mean() > 0.15  # the object is in the box


def test_zoom_out_training_masks_the_loss_to_the_image(pipe, concept_dir):
    from persres.images import read_folder
    from persres.train import ZOOM_VIEWS, cache_inputs

    images = [r.image for r in read_folder(concept_dir)]
    plain = cache_inputs(pipe, images, "a photo of a sks circle", 16, flip=True)
    assert plain.mask is None
    source = cache_inputs(pipe, images, "a photo of a sks circle", 16, flip=True, scale_min=0.5, seed=1)
    n = 2 * len(images)
    assert source.mean.shape[0] == n * (1 + ZOOM_VIEWS)
    torch.testing.assert_close(source.mean[:n], plain.mean)  # the whole references come first, unchanged
    full = source.mask.flatten(1).all(dim=1)
    assert full[:n].all() and not full[n:].any()
    areas = source.mask[n:].flatten(1).sum(1)
    assert (areas > 0).all() and (areas < source.mask[0].numel()).all()
    mask = source.sample(4000, torch.Generator().manual_seed(0)).mask
    share = mask.flatten(1).all(dim=1).float().mean().item()
    assert 0.45 < share < 0.55, share  # half the draws whole references, half zoomed


def test_scale_min_is_range_checked():
    from persres.errors import InputError

    for bad in (0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(InputError, match="--scale-min"):
            TrainConfig(scale_min=bad)


def test_bf16_on_the_cpu_trains_fp32_factors_and_samples_with_lag(tiny_model, concept_dir):
    """What --precision auto picks on a CPU with native bf16: the frozen model in bf16, the factors,
    their optimizer state and the loss in fp32; LAG sampling through the fused bf16 kernel."""
    import math

    from persres.config import SampleConfig
    from persres.images import read_folder
    from persres.models import load_pipeline
    from persres.sample import generate
    from persres.tokens import BoundConcept
    from persres.train import train_residuals

    pipe = load_pipeline(str(tiny_model), "cpu", torch.bfloat16)
    images = [r.image for r in read_folder(concept_dir)]
    result = train_residuals(pipe, images, "sks", "circle", TrainConfig(steps=4, lr=1e-2))
    assert all(math.isfinite(x) for x in result.losses)
    assert all(t.dtype == torch.float32 for t in result.tensors.values())
    assert pipe.unet.dtype == torch.bfloat16
    residuals.load_concept(pipe.unet, "c", result.tensors)
    out = generate(pipe, "a sks circle", [BoundConcept("c", "sks", "circle")], SampleConfig(steps=3, lag=True, save_masks=True))
    assert 0 < out.masks["c"][0].mean() < 1


def test_the_training_target_is_the_schedulers_own_noise_and_velocity(pipe):
    """x_t and the v-prediction target against diffusers' own add_noise and get_velocity."""
    from persres.train import noised

    sched = pipe.scheduler
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    noisy, v = noised(sched.alphas_cumprod, latents, noise, t, "v_prediction")
    torch.testing.assert_close(noisy, sched.add_noise(latents, noise, t))
    torch.testing.assert_close(v, sched.get_velocity(latents, noise, t))
    _, eps = noised(sched.alphas_cumprod, latents, noise, t, "epsilon")
    assert torch.equal(eps, noise)
