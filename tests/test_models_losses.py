"""Losses: spatial discount against hand-computed distances, WGAN terms, gradient penalty."""

import math

import pytest
import torch

from models import losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spatial_discount_hand_computed_euclidean():
    # 4x5 mask, all hole except the known pixel (0, 0) and (3, 4): distances are Euclidean, not city-block.
    mask = torch.ones(1, 1, 4, 5)
    mask[0, 0, 0, 0] = 0
    mask[0, 0, 3, 4] = 0
    d2 = losses.squared_distance_to_known(mask)[0, 0]
    expected = torch.tensor([
        [0, 1, 4, 9, 9],
        [1, 2, 5, 5, 4],
        [4, 5, 5, 2, 1],
        [9, 9, 4, 1, 0],
    ], dtype=torch.float32)
    assert torch.equal(d2, expected)
    w = losses.spatial_discount(mask, gamma=0.9)
    assert w.shape == (1, 1, 4, 5) and w.dtype == torch.float32
    torch.testing.assert_close(w[0, 0], 0.9 ** expected.sqrt())
    assert w[0, 0, 0, 0] == 1 and w[0, 0, 3, 4] == 1  # known pixels weigh 1
    assert math.isclose(w[0, 0, 1, 1].item(), 0.9 ** math.sqrt(2), rel_tol=1e-6)


def test_spatial_discount_box_and_batch():
    mask = torch.zeros(2, 1, 9, 9)
    mask[0, 0, 2:7, 2:7] = 1  # 5x5 box: centre is 3 away from the nearest known pixel
    w = losses.spatial_discount(mask, gamma=0.5)
    assert w[0, 0, 4, 4].item() == pytest.approx(0.5**3)
    assert w[0, 0, 2, 2].item() == pytest.approx(0.5)  # a hole pixel next to a known one
    assert w[0, 0, 3, 3].item() == pytest.approx(0.5**2)
    assert torch.all(w[1] == 1)  # no hole
    assert torch.all(w[0][mask[0] == 0] == 1)


def test_spatial_discount_brute_force_random_masks():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 1, 13, 17, generator=g) < 0.8).float()
    d2 = losses.squared_distance_to_known(mask)
    ys, xs = torch.meshgrid(torch.arange(13), torch.arange(17), indexing="ij")
    for b in range(3):
        known = (mask[b, 0] == 0).nonzero().float()  # (K, 2)
        pts = torch.stack([ys.flatten(), xs.flatten()], 1).float()  # (N, 2)
        brute = torch.cdist(pts, known).square().amin(1).round().view(13, 17)
        assert torch.equal(d2[b, 0], brute)


def test_spatial_discount_all_hole_sample_is_one():
    mask = torch.ones(1, 1, 6, 6)
    assert torch.all(losses.spatial_discount(mask) == 1)


def test_l1_and_ae_losses():
    gt = torch.zeros(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    coarse = torch.full_like(gt, 0.5)
    refined = torch.full_like(gt, 0.25)
    weight = torch.ones_like(mask)
    assert losses.l1_loss(gt, coarse, refined, mask, weight).item() == pytest.approx(1.2 * 0.5 + 0.25)
    # ae: mean over all pixels of error on known ones, divided by the known fraction (1/2)
    assert losses.ae_loss(gt, coarse, refined, mask).item() == pytest.approx(1.2 * 0.5 + 0.25)
    # errors outside the holes do not count in l1
    refined2 = refined + 10 * (1 - mask)
    assert losses.l1_loss(gt, coarse, refined2, mask, weight).item() == pytest.approx(1.2 * 0.5 + 0.25)


def test_wgan_terms():
    d_real, d_fake = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.5], [-0.5]])
    assert losses.critic_loss(d_real, d_fake).item() == pytest.approx(0.0 - 2.0)
    assert losses.generator_adv_loss(d_fake).item() == pytest.approx(0.0)


class _Linear(torch.nn.Module):
    """D(x) = sum(w * x): its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (self.w * x).flatten(1).sum(1, keepdim=True)


def _images():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    fake = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    return real, fake, mask


def test_gradient_penalty_zero_for_unit_slope_over_holes():
    real, fake, mask = _images()
    w = torch.randn(1, 3, 8, 8) * 5  # arbitrary on known pixels
    hole = mask[0].expand(3, 8, 8).bool()
    w[0][hole] = 1.0 / hole.sum().sqrt()  # unit norm over hole pixels
    gp = losses.gradient_penalty(_Linear(w), real, fake, mask)
    assert torch.isfinite(gp) and gp.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_ignores_known_pixels_and_reaches_critic():
    real, fake, mask = _images()
    w = torch.randn(1, 3, 8, 8)
    critic = _Linear(w * (1 - mask[:1]))  # depends on known pixels only
    gp = losses.gradient_penalty(critic, real, fake, mask)
    assert gp.item() == pytest.approx(1.0, abs=1e-5)  # slope over holes is 0 (up to the sqrt epsilon)
    critic = _Linear(w.clone())
    gp = losses.gradient_penalty(critic, real, fake, mask)
    gp.backward()  # create_graph=True: the penalty reaches the critic's parameters
    g = critic.w.grad
    assert torch.isfinite(g).all() and g[0][mask[0].expand(3, 8, 8) > 0].abs().sum() > 0
    assert torch.all(g[0][mask[0].expand(3, 8, 8) == 0] == 0)  # known-pixel weights get no gradient


def test_gradient_penalty_on_real_critic_is_finite():
    from models import local_critic

    torch.manual_seed(0)
    real, fake, mask = _images()
    real, fake = real.repeat(1, 1, 4, 4), fake.repeat(1, 1, 4, 4)
    mask = mask.repeat(1, 1, 4, 4)
    critic = local_critic(cnum=4, size=32)
    gp = losses.gradient_penalty(critic, real, fake.requires_grad_(True), mask)
    gp.backward()
    assert torch.isfinite(gp)
    # weights reach the penalty (biases of a piecewise-linear critic do not change its input gradient)
    weights = [p.grad for n, p in critic.named_parameters() if n.endswith("weight")]
    assert len(weights) == 5 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in weights)
