"""LAG on a real (tiny) UNet, checked against an independent recomputation of the paper's rule.

For every block and every UNet evaluation: the concept's map is recomputed from attn2's own
projections (softmax(QK^T * scale), summed over the concept's tokens, averaged over heads,
the conditional half under CFG), binarized above its lower median by sorting, and the
proj_out output must equal  W x + s * M ⊙ ΔW x  with ΔW = A B formed here from the factors.
"""

import pytest
import torch

from persres import residuals
from persres.config import SampleConfig
from persres.sample import concept_tokens, generate
from persres.testing import concept_shares
from persres.tokens import BoundConcept


def attn2_modules(unet):
    return {name.split(".transformer_blocks.")[0]: m for name, m in unet.named_modules() if name.endswith("attn2")}


def independent_map(attn, hidden, context, positions, cfg: bool) -> torch.Tensor:
    """(B, N): the attention of every pixel to the concept's tokens, from the module's own weights."""
    q, k = attn.to_q(hidden), attn.to_k(context)  # (B, N, C), (B, T, C)
    b, n, c = q.shape
    heads = attn.heads
    q = q.view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, d)
    k = k.view(b, -1, heads, c // heads).transpose(1, 2)  # (B, heads, T, d)
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * attn.scale, dim=-1)  # (B, heads, N, T)
    maps = probs[..., list(positions)].sum(-1).mean(1)  # (B, N)
    if cfg:  # [uncond, cond]: the conditional half decides for both
        cond = maps[b // 2:]
        maps = torch.cat([cond, cond])
    return maps


def above_lower_median(maps: torch.Tensor) -> torch.Tensor:
    ordered = maps.sort(dim=-1).values
    threshold = ordered[:, (maps.shape[-1] - 1) // 2 : (maps.shape[-1] - 1) // 2 + 1]
    return (maps > threshold).float()


def delta_of(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """ΔW x with ΔW = A B formed here (m, m), for a conv (B, C, H, W) or linear (B, N, C) proj_out input."""
    factors = layer.residuals[name]
    dw = (factors.up.detach().double() @ factors.down.detach().double())  # (m, m)
    if x.ndim == 4:
        return torch.einsum("oc,bchw->bohw", dw, x.double())
    return x.double() @ dw.T


@pytest.mark.parametrize("strength,size,guidance", [(1.0, (32, 32), 6.0), (0.7, (32, 48), 6.0), (1.0, (32, 32), 1.0)],
                         ids=["paper", "strength-0.7-non-square", "no-guidance"])
def test_lag_output_is_the_paper_rule_recomputed_independently(pipe, strength, size, guidance):
    unet = pipe.unet
    residuals.new_concept(unet, "a", residuals.ranks_for(unet), init="random")
    for layer in residuals.layers_of(unet).values():  # large enough that a wrong mask cannot hide in rounding
        layer.residuals["a"].up.data.mul_(4.0)
    concept = BoundConcept("a", "sks", "circle", strength)
    prompt = "a sks circle on a red background"
    [tokens] = concept_tokens(pipe.tokenizer, prompt, [concept])
    cfg = guidance > 1
    maps, checked, calls = {}, [], []
    hooks = [unet.register_forward_pre_hook(lambda *a: calls.append(1))]
    for block, attn in attn2_modules(unet).items():
        def record(module, args, kwargs, output, block=block):
            maps[block] = independent_map(module, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                                          tokens.positions, cfg)
        hooks.append(attn.register_forward_hook(record, with_kwargs=True))
    for block, layer in residuals.layers_of(unet).items():
        def check(module, args, output, block=block):
            x = args[0]
            mask = above_lower_median(maps.pop(block))  # (B, N)
            mask = mask.view(x.shape[0], 1, *x.shape[2:]) if x.ndim == 4 else mask.unsqueeze(-1)
            expected = module.base_layer(x).double() + strength * mask.double() * delta_of(module, "a", x)
            torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)
            assert 0 < mask.mean().item() < 1
            checked.append(block)
        hooks.append(layer.register_forward_hook(check))
    try:
        result = generate(pipe, prompt, [concept], SampleConfig(steps=3, lag=True, guidance=guidance, height=size[0], width=size[1]))
    finally:
        for h in hooks:
            h.remove()
    blocks = set(residuals.layers_of(unet))
    assert len(checked) == 3 * len(blocks) and set(checked) == blocks  # every block, every step
    assert len(calls) == 3  # one UNet evaluation per step, CFG batched or not
    assert result.images[0].size == (size[1], size[0])


def test_three_concepts_each_act_only_in_their_own_disjoint_region(pipe):
    """Several concepts in one pass: at every pixel of every block the residual added is exactly one
    concept's ΔW x or nothing, each concept acts somewhere once the delay is over, none beyond half
    the pixels, and the UNet runs once per step."""
    unet = pipe.unet
    names = ["a", "b", "c"]
    for seed, name in enumerate(names):
        residuals.new_concept(unet, name, residuals.ranks_for(unet), init="random", seed=seed)
        for layer in residuals.layers_of(unet).values():
            layer.residuals[name].up.data.mul_(4.0)
    concepts = [BoundConcept("a", "sks", "circle"), BoundConcept("b", "zwx", "heart"), BoundConcept("c", "qrv", "square")]
    prompt = "a sks circle and a zwx heart and a qrv square"
    steps = 5
    acted: dict[str, float] = {n: 0.0 for n in names}
    seen, calls = [], []

    def check(module, args, output):
        x = args[0]
        added = output.double() - module.base_layer(x).double()  # (B, C, H, W)
        deltas = torch.stack([delta_of(module, n, x) for n in names])  # (K, B, C, H, W)
        shares, error = concept_shares(added, deltas, channel_dim=-3)
        assert error < 1e-4  # every pixel is one of: nothing, or exactly one concept's delta
        n = x.shape[-2] * x.shape[-1]
        for name, share in zip(names, shares):
            assert share <= 0.5 + 1.0 / n
            acted[name] = max(acted[name], share)
        seen.append(1)

    hooks = [layer.register_forward_hook(check) for layer in residuals.layers_of(unet).values()]
    hooks.append(unet.register_forward_pre_hook(lambda *a: calls.append(1)))
    try:
        generate(pipe, prompt, concepts, SampleConfig(steps=steps, lag=True))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == steps
    assert len(seen) == steps * len(residuals.layers_of(unet))
    assert all(share > 0 for share in acted.values()), acted


def test_no_residual_is_computed_during_the_several_concept_delay(pipe, monkeypatch):
    """While the base model alone lays out the image (the first `delay` of the steps), no concept's
    factors run; afterwards every concept's residual acts once per block and step."""
    from persres.config import MultiLagConfig

    unet = pipe.unet
    names = ["a", "b"]
    for seed, name in enumerate(names):
        residuals.new_concept(unet, name, residuals.ranks_for(unet), init="random", seed=seed)
    concepts = [BoundConcept("a", "sks", "circle"), BoundConcept("b", "zwx", "heart")]
    layers = residuals.layers_of(unet)
    per_evaluation: list[int] = []  # concepts acting, per evaluation
    computed: list[int] = []  # factor products run, per evaluation
    region, residual_sum = residuals.ResidualProjOut.region, residuals.residual_sum

    def counted_region(self, name, out):
        mask = region(self, name, out)
        per_evaluation[-1] += mask is not None
        return mask

    def counted_sum(x, acting, conv):
        computed[-1] += len(acting)
        return residual_sum(x, acting, conv)

    monkeypatch.setattr(residuals.ResidualProjOut, "region", counted_region)
    monkeypatch.setattr(residuals, "residual_sum", counted_sum)
    hooks = []

    def evaluation_starts(*args):
        per_evaluation.append(0)
        computed.append(0)

    hooks.append(unet.register_forward_pre_hook(evaluation_starts))
    try:
        generate(pipe, "a sks circle and a zwx heart", concepts, SampleConfig(steps=5, lag=True, multi=MultiLagConfig(delay=0.4)))
    finally:
        for h in hooks:
            h.remove()
    assert computed[:2] == [0, 0] and all(c > 0 for c in computed[2:])
    assert per_evaluation == [0, 0] + [len(layers) * len(names)] * 3  # round(0.4 * 5) = 2 delayed evaluations
