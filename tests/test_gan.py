"""Fast unit tests of the WGAN-GP updates (models.gan) on tiny networks, CPU, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.gan import GanOptions, critic_step, frozen, generator_step

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(seed: int = 0, attention: str = "contextual"):
    """A generator of width 4 (``attention``: its refinement network), both critics and their optimisers."""
    torch.manual_seed(seed)
    gen = models.InpaintGenerator(cnum=4, attention=attention)
    local = models.local_critic(cnum=4, size=SIZE // 2)
    glob = models.global_critic(cnum=4, size=SIZE)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(list(local.parameters()) + list(glob.parameters()), lr=1e-3, betas=(0.5, 0.9))
    return gen, local, glob, opt_g, opt_d


def _batch(seed: int = 1, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, SIZE)
    smooth = torch.stack([ramp.view(1, -1).expand(SIZE, SIZE), ramp.view(-1, 1).expand(SIZE, SIZE),
                          -ramp.view(1, -1).expand(SIZE, SIZE)])  # (3, H, W): a smooth picture in [-1, 1]
    noise = torch.rand(b, 3, SIZE, SIZE, generator=g) * 0.2 - 0.1
    image = (smooth + noise).clamp(-1, 1)  # (B, 3, H, W) in [-1, 1]
    mask = torch.zeros(b, 1, SIZE, SIZE)
    mask[0, :, 8:20, 6:18] = 1  # one box per sample, different places
    mask[1, :, 14:30, 10:22] = 1
    weight = mask.clone()  # a discount of 1 inside holes is enough here
    return image, mask, weight


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before):
    return [not torch.equal(p, q) for p, q in zip(module.parameters(), before)]


def test_critic_step_updates_only_the_critics_and_reports_finite_metrics():
    gen, local, glob, _, opt_d = _setup()
    image, mask, _ = _batch()
    g0, l0, gl0 = _snapshot(gen), _snapshot(local), _snapshot(glob)
    out = critic_step(gen, local, glob, opt_d, image, mask, local_size=SIZE // 2)
    assert set(out) == {"d_loss", "d_wasserstein", "d_gp"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["d_gp"] >= 0
    assert not any(_changed(gen, g0))
    for critic, before in ((local, l0), (glob, gl0)):
        assert all(p.grad is not None for p in critic.parameters())
        # every weight matrix / kernel moves (the last bias cannot: D(real) - D(fake) does not depend on it)
        assert all(c for c, p in zip(_changed(critic, before), before) if p.dim() > 1)
    assert all(p.grad is None for p in gen.parameters())


def test_generator_step_updates_only_the_generator_and_unfreezes_the_critics():
    gen, local, glob, opt_g, _ = _setup()
    image, mask, weight = _batch()
    g0, l0, gl0 = _snapshot(gen), _snapshot(local), _snapshot(glob)
    out = generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=SIZE // 2)
    assert set(out) == {"g_loss", "g_l1", "g_ae", "g_adv"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # every generator parameter gets a gradient (at 32x32 the attention branch's may be zero: its tiny
    # feature map has no fully known background patch), and the generator moves
    assert all(p.grad is not None for p in gen.parameters())
    assert sum(_changed(gen, g0)) > len(g0) // 2
    assert not any(_changed(local, l0)) and not any(_changed(glob, gl0))
    assert all(p.requires_grad for p in list(local.parameters()) + list(glob.parameters()))
    assert all(p.grad is None for p in list(local.parameters()) + list(glob.parameters()))


def test_generator_loss_is_the_weighted_sum_of_its_terms():
    gen, local, glob, opt_g, _ = _setup()
    image, mask, weight = _batch()
    w = GanOptions(l1_weight=0.7, ae_weight=0.3, gan_weight=0.05, gp_weight=10.0, coarse_weight=1.2)
    out = generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=SIZE // 2, gan=w)
    expected = 0.7 * out["g_l1"] + 0.3 * out["g_ae"] + 0.05 * out["g_adv"]
    assert math.isclose(out["g_loss"], expected, rel_tol=1e-5, abs_tol=1e-6)


def test_critic_loss_is_the_wasserstein_term_plus_the_weighted_penalty():
    gen, local, glob, _, opt_d = _setup()
    image, mask, _ = _batch()
    out = critic_step(gen, local, glob, opt_d, image, mask, local_size=SIZE // 2, gan=GanOptions(gp_weight=3.0))
    assert math.isclose(out["d_loss"], -out["d_wasserstein"] + 3.0 * out["d_gp"], rel_tol=1e-5, abs_tol=1e-6)


def test_gan_options_defaults_and_validation():
    gan = GanOptions()
    assert (gan.n_critic, gan.l1_weight, gan.ae_weight, gan.gan_weight, gan.gp_weight, gan.coarse_weight) == (
        5, 1.2, 1.2, 0.001, 10.0, 1.2)
    gan.gp_weight = 3.0  # a plain (mutable) dataclass: the config tree sets its fields
    with pytest.raises(ValueError, match=r"^gan\.n_critic must be >= 1, got 0$"):
        GanOptions(n_critic=0)
    with pytest.raises(ValueError, match=r"^gan\.l1_weight must be >= 0, got -1\.0$"):
        GanOptions(l1_weight=-1.0)
    with pytest.raises(ValueError, match=r"^gan\.coarse_weight must be >= 0"):
        GanOptions(coarse_weight=-0.5)


def test_frozen_restores_requires_grad():
    _, local, _, _, _ = _setup()
    first = next(local.parameters())
    first.requires_grad_(False)  # a parameter frozen by the caller stays frozen
    with frozen(local):
        assert not any(p.requires_grad for p in local.parameters())
    assert not first.requires_grad
    assert all(p.requires_grad for p in list(local.parameters())[1:])


def test_a_few_generator_steps_on_one_batch_lower_the_reconstruction_loss():
    gen, local, glob, opt_g, opt_d = _setup()
    image, mask, weight = _batch()
    first = None
    for _ in range(20):
        critic_step(gen, local, glob, opt_d, image, mask, local_size=SIZE // 2)
        out = generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=SIZE // 2)
        first = out if first is None else first
    assert out["g_l1"] + out["g_ae"] < 0.8 * (first["g_l1"] + first["g_ae"])
