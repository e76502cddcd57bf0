"""Generator and critics: shapes, parameter counts, gradients, a few optimiser steps."""

import pytest
import torch

from models import (Critic, InpaintGenerator, crop_around_holes, global_critic, hole_crop_corners, local_critic,
                    losses)

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
    assert sum(p.numel() for p in local_critic(cnum=64, size=128).parameters()) == 4_339_329
    assert sum(p.numel() for p in global_critic(cnum=64, size=256).parameters()) == 2_733_441


def test_critic_factories_and_state_dict_keys():
    local, glob = local_critic(cnum=8, size=32), global_critic(cnum=8, size=64)
    assert isinstance(local, Critic) and isinstance(glob, Critic)
    assert local.features[3].conv.out_channels == 64 and glob.features[3].conv.out_channels == 32
    keys = [f"features.{i}.conv.{t}" for i in range(4) for t in ("weight", "bias")] + ["linear.weight", "linear.bias"]
    assert list(local.state_dict()) == keys and list(glob.state_dict()) == keys
    same = Critic(cnum=8, size=32, last_mult=8)
    same.load_state_dict(local.state_dict())  # the same layout as local_critic
    with pytest.raises(ValueError, match="multiple of 16"):
        Critic(size=40)


@pytest.mark.parametrize("H,W", [(64, 64), (48, 80), (72, 40)])
def test_generator_shapes(H, W):
    gen = InpaintGenerator(cnum=8)
    image, mask = _batch(2, H, W)
    coarse, refined, offsets = gen(image, mask)
    assert coarse.shape == refined.shape == (2, 3, H, W)
    assert offsets.shape == (2, 2, H // 8, W // 8) and offsets.dtype == torch.int64
    assert coarse.abs().max() <= 1 and refined.abs().max() <= 1
    assert gen.attention is gen.get_submodule("attention")


def _hole_rows_masks(H, W):
    """Masks whose hole rows span little of the image: a thin stripe at the top, a box at the bottom, two
    holes far apart in one sample and one hole in the other, no hole at all."""
    masks = []
    m = torch.zeros(2, 1, H, W)
    m[:, :, 0:3, 10:40] = 1
    masks.append(m)
    m = torch.zeros(2, 1, H, W)
    m[:, :, H - 20:H - 5, 5:30] = 1
    masks.append(m)
    m = torch.zeros(2, 1, H, W)
    m[0, :, 30:37, 8:20] = 1
    m[0, :, 100:104, 40:60] = 1
    m[1, :, 61:66, 20:50] = 1
    masks.append(m)
    masks.append(torch.zeros(2, 1, H, W))
    return masks


def test_holes_only_keeps_the_hole_pixels_and_skips_rows():
    """holes_only skips attention rows that cannot reach a hole; the hole pixels of ``refined`` must not
    change at all, and rows must really be skipped."""
    torch.manual_seed(0)
    gen = InpaintGenerator(cnum=8).eval().double()  # float64: summation order cannot hide a difference
    H, W = 160, 64
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    for mask in _hole_rows_masks(H, W):
        mask = mask.double()
        with torch.no_grad():
            _, full, off_full = gen(image, mask)
            _, fast, off_fast = gen(image, mask, holes_only=True)
        hole = mask.bool().expand_as(full)
        torch.testing.assert_close(fast[hole], full[hole], rtol=0, atol=1e-12)
        lo, hi = gen._attention_rows(torch.nn.functional.max_pool2d(mask, 4))
        assert hi - lo < H // 8  # rows were skipped
        assert (off_fast[:, :, :lo] == 0).all() and (off_fast[:, :, hi:] == 0).all()
        assert torch.equal(off_fast[:, :, lo:hi], off_full[:, :, lo:hi])


def test_holes_only_needs_the_whole_reach(monkeypatch):
    """A reach one row shorter changes hole pixels: the reach is not larger than the layers need."""
    torch.manual_seed(0)
    gen = InpaintGenerator(cnum=8).eval().double()
    image = torch.rand(1, 3, 160, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    mask = torch.zeros(1, 1, 160, 64, dtype=torch.float64)
    mask[:, :, 60:72, 10:50] = 1
    with torch.no_grad():
        _, full, _ = gen(image, mask)
        monkeypatch.setattr(InpaintGenerator, "ATTENTION_REACH", InpaintGenerator.ATTENTION_REACH - 1)
        _, short, _ = gen(image, mask, holes_only=True)
    hole = mask.bool().expand_as(full)
    assert (short[hole] - full[hole]).abs().max() > 1e-9


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
    assert local_critic(cnum=8, size=32)(x[:, :, :32, :32]).shape == (3, 1)
    assert global_critic(cnum=8, size=64)(x).shape == (3, 1)


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
