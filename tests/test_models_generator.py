"""Generator and critics: shapes, parameter counts, gradients, a few optimiser steps."""

import pytest
import torch

from models import GlobalCritic, InpaintGenerator, LocalCritic, crop_around_holes, hole_crop_corners, losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=g) * 2 - 1
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, H // 4:H // 2, W // 4:W // 2] = 1
    if B > 1:
        mask[1, :, H // 2:H - 4, 2:W // 3] = 1
        mask[1, :, 2:10, W - 12:W - 2] = 1  # a second hole
    return image, mask


def test_parameter_count_matches_release():
    assert sum(p.numel() for p in InpaintGenerator(cnum=32).parameters()) == 3_601_542


def test_critic_parameter_counts():
    assert sum(p.numel() for p in LocalCritic(cnum=64, size=128).parameters()) == 4_339_329
    assert sum(p.numel() for p in GlobalCritic(cnum=64, size=256).parameters()) == 2_733_441


@pytest.mark.parametrize("H,W", [(64, 64), (48, 80), (72, 40)])
def test_generator_shapes(H, W):
    gen = InpaintGenerator(cnum=8)
    image, mask = _batch(2, H, W)
    coarse, refined, offsets = gen(image, mask)
    assert coarse.shape == refined.shape == (2, 3, H, W)
    assert offsets.shape == (2, 2, H // 8, W // 8) and offsets.dtype == torch.int64
    assert coarse.abs().max() <= 1 and refined.abs().max() <= 1
    assert gen.attention is gen.get_submodule("attention")


def test_generator_rejects_sizes_not_multiple_of_8():
    gen = InpaintGenerator(cnum=8)
    image, mask = _batch(1, 60, 64)
    with pytest.raises(ValueError, match="multiples of 8"):
        gen(image, mask)


def test_gradients_reach_every_generator_parameter():
    torch.manual_seed(0)
    gen = InpaintGenerator(cnum=8)
    image, mask = _batch(2, 64, 64)
    coarse, refined, _ = gen(image, mask)
    (coarse.square().mean() + refined.square().mean()).backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_generator_bf16_autocast_cpu():
    gen = InpaintGenerator(cnum=8)
    image, mask = _batch(2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse, refined, offsets = gen(image, mask)
        refined.float().mean().backward()
    assert torch.isfinite(refined.float()).all() and offsets.dtype == torch.int64
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


def test_critics_shapes():
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert LocalCritic(cnum=8, size=32)(x[:, :, :32, :32]).shape == (3, 1)
    assert GlobalCritic(cnum=8, size=64)(x).shape == (3, 1)


def test_crop_around_holes_centres_and_clamps():
    x = torch.arange(2 * 1 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 6:10, 5:9] = 1  # centre (8, 7)
    mask[1, :, 0:2, 13:16] = 1  # corner: clamped
    assert hole_crop_corners(mask, 8).tolist() == [[4, 3], [0, 8]]
    crops = crop_around_holes(x, mask, 8)
    assert crops.shape == (2, 1, 8, 8)
    assert torch.equal(crops[0], x[0, :, 4:12, 3:11]) and torch.equal(crops[1], x[1, :, 0:8, 8:16])
    assert crop_around_holes(mask, mask, 8)[0].sum() == 16  # the whole hole is inside the crop


def test_few_optimizer_steps_lower_the_loss():
    torch.manual_seed(0)
    gen = InpaintGenerator(cnum=8)
    _, mask = _batch(2, 64, 64)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    image = torch.stack([xx, yy, xx * yy]).expand(2, 3, 64, 64) * 0.8  # a smooth, learnable image
    weight = losses.spatial_discount(mask)
    opt = torch.optim.Adam(gen.parameters(), lr=2e-3)

    def loss_fn():
        coarse, refined, _ = gen(image, mask)
        return losses.l1_loss(image, coarse, refined, mask, weight) + losses.ae_loss(image, coarse, refined, mask)

    first = loss_fn().item()
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.9 * first
