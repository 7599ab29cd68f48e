import pytest
import torch

from persres import residuals
from persres.config import SampleConfig
from persres.lag import ConceptTokens, LagSession, lag_regions, median_mask, regions_from_maps
from persres.sample import generate
from persres.tokens import BoundConcept


def test_median_binarization_puts_half_the_pixels_in_the_mask():
    maps = torch.rand(3, 2, 64)
    mask = median_mask(maps)
    assert mask.shape == maps.shape
    assert (mask.sum(-1) == 32).all()
    # everything in the mask attends more than everything outside it
    for b in range(3):
        for k in range(2):
            assert maps[b, k][mask[b, k]].min() > maps[b, k][~mask[b, k]].max()


def test_two_concepts_regions_are_disjoint_and_inside_their_median_masks():
    maps = torch.rand(4, 2, 256)
    regions = regions_from_maps(maps)
    assert ((regions[:, 0] * regions[:, 1]) == 0).all()
    assert (regions.bool() <= median_mask(maps)).all()
    # where both masks are on, the higher normalized attention wins
    norm = maps / maps.amax(-1, keepdim=True)
    both = median_mask(maps).all(dim=1)  # (B, N)
    winner = norm.argmax(dim=1)
    assert (regions.argmax(dim=1)[both] == winner[both]).all()
    assert both.any()


def test_raw_conflict_rule_gives_an_overlap_to_the_larger_attention():
    from persres.config import MultiLagConfig
    from persres.errors import InputError

    # pixel 1 is in both masks: concept 0 attends 0.45 there (its peak is 0.5), concept 1 0.3 (its peak)
    maps = torch.tensor([[[0.1, 0.45, 0.5, 0.0], [0.0, 0.3, 0.0, 0.1]]])  # (1, 2, 4)
    normalized = regions_from_maps(maps, 0.5)
    raw = regions_from_maps(maps, 0.5, "raw")
    assert normalized[0, :, 1].tolist() == [0.0, 1.0]  # 0.3/0.3 beats 0.45/0.5
    assert raw[0, :, 1].tolist() == [1.0, 0.0]  # 0.45 beats 0.3
    assert ((raw[:, 0] * raw[:, 1]) == 0).all()
    with pytest.raises(InputError, match="conflict"):
        MultiLagConfig(conflict="loudest")


def test_single_concept_region_is_its_median_mask():
    maps = torch.rand(2, 1, 16)
    assert torch.equal(regions_from_maps(maps).bool(), median_mask(maps))


def test_cfg_uses_the_conditional_half_for_both_halves():
    session = LagSession([ConceptTokens("a", (1,))], guided=True)
    uncond, cond = torch.rand(1, 1, 16), torch.rand(1, 1, 16)
    session.record("blk", torch.cat([uncond, cond]))
    x = torch.zeros(2, 4, 4, 4)
    mask = session.region("blk", "a", x)
    assert mask.shape == (2, 1, 4, 4)
    assert torch.equal(mask[0], mask[1])
    assert torch.equal(mask[1].flatten().bool(), median_mask(cond)[0, 0])


class FixedRegions:
    def __init__(self, value):
        self.value = value

    def region(self, block, concept, x):
        shape = (x.shape[0], 1, *x.shape[2:]) if x.ndim == 4 else (x.shape[0], x.shape[1], 1)
        return torch.full(shape, self.value)


def out(unet):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), 20, encoder_hidden_states=torch.randn(2, 32, 32, generator=g)).sample


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_linear_model"])
def test_all_zero_mask_is_the_base_model_and_all_one_mask_is_the_merged_model(model_fixture, request):
    from persres.models import load_pipeline

    unet = load_pipeline(str(request.getfixturevalue(model_fixture))).unet
    base = out(unet)
    residuals.new_concept(unet, "a", residuals.ranks_for(unet), init="random")
    with residuals.use_concepts(unet, ["a"], merged=True):
        merged = out(unet)
    assert not torch.allclose(merged, base)
    layers = residuals.layers_of(unet).values()
    for value, expected in ((0.0, base), (1.0, merged)):
        for layer in layers:
            layer.regions = FixedRegions(value)
        torch.testing.assert_close(out(unet), expected, rtol=1e-4, atol=1e-5)
    for layer in layers:
        layer.regions = None


def count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_lag_adds_no_model_evaluation_and_differs_from_no_lag(pipe):
    residuals.new_concept(pipe.unet, "a", residuals.ranks_for(pipe.unet), init="random")
    concept = BoundConcept("a", "sks", "circle")
    calls, handle = count_unet_calls(pipe.unet)
    plain = generate(pipe, "a sks circle on a red background", [concept], SampleConfig(steps=4, lag=False))
    n_plain = len(calls)
    lagged = generate(pipe, "a sks circle on a red background", [concept], SampleConfig(steps=4, lag=True, save_masks=True))
    handle.remove()
    assert n_plain == 4 and len(calls) == 8
    a, b = (torch.tensor(list(r.images[0].getdata()), dtype=torch.float32) for r in (plain, lagged))
    assert (a - b).abs().max() > 0
    mask = lagged.masks["a"][0]
    assert mask.shape == (8, 8) and 0 < mask.mean() < 1


def test_lag_regions_record_maps_in_every_transformer_block(pipe):
    residuals.new_concept(pipe.unet, "a", residuals.ranks_for(pipe.unet))
    tokens = [ConceptTokens("a", (2, 3))]
    blocks = set(residuals.layers_of(pipe.unet))
    seen = set()
    with lag_regions(pipe.unet, tokens, guided=False) as session:
        original = session.record
        session.record = lambda block, maps: (seen.add(block), original(block, maps))
        out(pipe.unet)
    assert seen == blocks
    assert all(layer.regions is None for layer in residuals.layers_of(pipe.unet).values())


def test_two_concepts_in_one_pass_take_one_evaluation_per_step_and_a_mask_each(pipe):
    """(Disjoint regions on a real UNet: tests/test_lag_end_to_end.py.)"""
    ranks = residuals.ranks_for(pipe.unet)
    residuals.new_concept(pipe.unet, "a", ranks, init="random")
    residuals.new_concept(pipe.unet, "b", ranks, init="random", seed=1)
    concepts = [BoundConcept("a", "sks", "circle"), BoundConcept("b", "zwx", "heart")]
    calls, handle = count_unet_calls(pipe.unet)
    result = generate(pipe, "a sks circle and a zwx heart on a red background", concepts, SampleConfig(steps=3, lag=True, save_masks=True))
    handle.remove()
    assert len(calls) == 3
    assert set(result.masks) == {"a", "b"}


@pytest.mark.parametrize("lag", [False, True])
def test_loaded_concepts_the_prompt_does_not_name_stay_off(pipe, lag):
    plain = generate(pipe, "a red circle", [], SampleConfig(steps=2, lag=lag)).images[0]
    residuals.new_concept(pipe.unet, "a", residuals.ranks_for(pipe.unet), init="random")
    again = generate(pipe, "a red circle", [], SampleConfig(steps=2, lag=lag)).images[0]
    assert list(plain.getdata()) == list(again.getdata())


def test_reference_backend_without_lag_matches_the_default(pipe):
    default = generate(pipe, "a red circle", [], SampleConfig(steps=2)).images[0]
    reference = generate(pipe, "a red circle", [], SampleConfig(steps=2), backend="reference").images[0]
    diff = (torch.tensor(list(default.getdata())) - torch.tensor(list(reference.getdata()))).abs().max()
    assert diff <= 1  # the same picture up to rounding


def test_unavailable_backend_is_refused_before_sampling(pipe):
    from persres.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable):
        generate(pipe, "a red circle", [], SampleConfig(steps=2), backend="flash9")


def drive(session, evaluations: int, blocks=("b0", "b1"), n: int = 16, seed: int = 0):
    """Feed the session `evaluations` UNet passes of random maps; the regions of each pass, per block
    (None for a pass where no residual acts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 4, 4, 4)
    out = []
    for _ in range(evaluations):
        session.begin_evaluation()
        per = {}
        for block in blocks:
            session.record(block, torch.rand(1, len(session.concepts), n, generator=g))
            regions = [session.region(block, c.name, x) for c in session.concepts]
            per[block] = None if all(r is None for r in regions) else torch.stack(regions)
        out.append(per)
    return out


def test_multi_concept_options_leave_a_single_concept_on_the_paper_rule():
    from persres.config import MultiLagConfig

    multi = MultiLagConfig(tokens="class", coverage=0.25, maps="aggregate", delay=0.5)
    one = [ConceptTokens("a", (1, 2), (2,))]
    paper = drive(LagSession(one, guided=False, latent_hw=(4, 4)), 3)
    tuned = drive(LagSession(one, guided=False, latent_hw=(4, 4), multi=multi, steps=3), 3)
    for p, t in zip(paper, tuned):
        for block in p:
            assert torch.equal(p[block], t[block])
    assert LagSession(one, guided=False, multi=multi).token_sets == [(1, 2)]


def test_multi_concept_tokens_coverage_and_delay():
    from persres.config import MultiLagConfig

    two = [ConceptTokens("a", (1, 2), (2,)), ConceptTokens("b", (4, 5), (5,))]
    session = LagSession(two, guided=False, latent_hw=(4, 4), multi=MultiLagConfig(tokens="class", coverage=0.25, delay=0.4), steps=5,
                         keep_masks=True)
    assert session.token_sets == [(2,), (5,)]
    passes = drive(session, 5)
    for k, per in enumerate(passes):
        for regions in per.values():
            if k < 2:  # round(0.4 * 5) = 2 passes of the base model alone: no region, so no residual is computed
                assert regions is None
            else:
                assert 0 < regions.sum().item() <= 2 * 4  # each concept at most a quarter of the 16 pixels, disjoint
    assert session.evaluation == 4
    session.end_evaluation()  # lag_regions tells the session when the last evaluation is over
    assert session.mask_counts == 3 * 2  # masks kept from the 3 passes with residuals (2 blocks each), not the delayed ones
    kept = sum(torch.cat([per[b] for b in per], dim=1).flatten(1).sum(1) for per in passes[2:]) / 16 / 6  # (K,) mean on
    assert torch.allclose(torch.stack([m.mean() for m in session.average_masks().values()]), kept)


def test_aggregate_maps_come_from_the_previous_pass_of_every_block():
    from persres.config import MultiLagConfig

    two = [ConceptTokens("a", (1,)), ConceptTokens("b", (2,))]
    session = LagSession(two, guided=False, latent_hw=(4, 4), multi=MultiLagConfig(maps="aggregate"))
    first = torch.zeros(1, 2, 16)
    first[0, 0, :8], first[0, 1, 8:] = 1.0, 1.0  # a: top half, b: bottom half
    x = torch.zeros(1, 4, 4, 4)
    session.begin_evaluation()
    for block in ("b0", "b1"):
        session.record(block, first)
        session.region(block, "a", x)
    flipped = first.flip(1)  # this pass's own maps say the opposite
    session.begin_evaluation()
    session.record("b0", flipped)
    a = session.region("b0", "a", x).flatten()
    assert a[:8].all() and not a[8:].any()  # the previous pass's aggregate decides, not this pass's block


def test_a_hosts_batch_layout_says_which_chunk_is_conditional():
    """ComfyUI may put the conditional chunk first, or run the unconditional batch alone: the conditional
    chunk's regions serve every chunk, and an unconditional-only evaluation takes the previous one's."""
    session = LagSession([ConceptTokens("a", (1,))], guided=True, latent_hw=(4, 4))
    cond, uncond = torch.rand(1, 1, 16), torch.rand(1, 1, 16)
    session.begin_evaluation(step=0, layout=[True, False])  # [cond, uncond]
    session.record("blk", torch.cat([cond, uncond]))
    mask = session.region("blk", "a", torch.zeros(2, 4, 4, 4))
    assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0].flatten().bool(), median_mask(cond)[0, 0])
    text = type("TextLayer", (), {"text": True, "block": "blk"})()
    rows = session.layer_region(text, "a", torch.zeros(2, 5, 8))[..., 0]  # (B, T): the concept's token, cond chunk only
    assert rows.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    session.begin_evaluation(step=1, layout=[False])  # the unconditional batch alone
    session.record("blk", torch.rand(1, 1, 16))  # its maps say nothing of the concept: not kept
    alone = session.region("blk", "a", torch.zeros(1, 4, 4, 4))
    assert torch.equal(alone[0], mask[0])
    assert session.step == 1 and session.evaluation == 1
