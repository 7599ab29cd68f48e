"""Growing the toy UNet to more layers per block changes nothing it computes, and adds the
transformer blocks (proj_outs) the residuals then live in."""

import pytest
import torch

from persres import residuals
from persres.toy.grow import grow_unet


def small_unet(layers_per_block):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=(32, 64, 64), norm_num_groups=32, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    with torch.no_grad():  # no zero-initialised layer in the old model, so any misrouting shows
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def outputs(unet):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 16, generator=g)
    return unet(x, torch.tensor([5, 400, 950]), encoder_hidden_states=text).sample


@pytest.mark.parametrize("old,new", [(1, [2, 2, 1]), (1, [3, 2, 2]), ([2, 1, 1], [3, 3, 1])])
def test_grown_unet_computes_what_the_old_one_did(old, new):
    unet = small_unet(old)
    grown = grow_unet(unet, new)
    assert list(grown.config.layers_per_block) == new
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in unet.parameters())
    with torch.no_grad():
        torch.testing.assert_close(outputs(grown), outputs(unet), rtol=1e-5, atol=1e-5)


def test_growing_adds_the_transformer_blocks_residuals_attach_to():
    unet = small_unet(1)
    assert len(residuals.transformer_blocks(unet)) == 7
    assert len(residuals.transformer_blocks(grow_unet(unet, [2, 2, 1]))) == 11


def test_grown_unet_trains_its_new_layers():
    grown = grow_unet(small_unet(1), [2, 2, 1]).train()
    new_proj_out = grown.down_blocks[0].attentions[1].proj_out
    assert new_proj_out.weight.abs().max() == 0
    loss = outputs(grown).pow(2).mean()
    loss.backward()
    assert new_proj_out.weight.grad.abs().max() > 0


@pytest.mark.parametrize("layers", [[1, 1], [2, 0, 1], [1, 1, 1, 1]])
def test_growing_refuses_fewer_layers_or_a_wrong_count(layers):
    unet = small_unet(2)
    with pytest.raises(ValueError, match="layers_per_block"):
        grow_unet(unet, layers)
