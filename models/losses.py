"""DeepFill v1 losses: spatially discounted L1, AE loss, WGAN terms and the gradient penalty over holes, and
the GAN losses of the paper's ablation (``gan_loss``: WGAN-GP, DCGAN, LSGAN).

Conventions: images (B,3,H,W) in [-1,1]; mask (B,1,H,W) float {0,1}, 1 = hole; critic outputs d_* (B,1)
float, unbounded scores (logits for DCGAN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _nearest_known_1d(known: torch.Tensor, dim: int) -> torch.Tensor:
    """Distance along `dim` to the nearest known pixel in the same line (inf if the line has none).

    known: (B,H,W) bool. Returns float32 (B,H,W)."""
    n = known.shape[dim]
    shape = [1, 1, 1]
    shape[dim] = n
    idx = torch.arange(n, dtype=torch.float32, device=known.device).view(shape)
    big = torch.tensor(float("inf"), device=known.device)
    before = torch.where(known, idx, -big).cummax(dim).values  # last known index at or before
    after = torch.where(known, idx, big).flip(dim).cummin(dim).values.flip(dim)  # first known at or after
    return torch.minimum(idx - before, after - idx)


def squared_distance_to_known(mask: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance from each pixel to the nearest known (mask 0) pixel.

    mask (B,1,H,W), 1 = hole. Returns float32 (B,1,H,W): 0 at known pixels, inf where a sample has no known
    pixel. Separable exact EDT: 1-D column distances g, then d^2(x) = min_k k^2 + g(x+k)^2 along rows, with k
    limited to |k| <= min(column, row) distance (an upper bound on every true distance). Memory O(B*H*W).
    """
    known = mask[:, 0] < 0.5  # (B, H, W)
    gv = _nearest_known_1d(known, 1)  # vertical distance (B, H, W)
    gh = _nearest_known_1d(known, 2)  # horizontal distance
    bound = torch.minimum(gv, gh)
    finite = bound[torch.isfinite(bound)]
    reach = int(finite.max().item()) if finite.numel() else 0
    g2 = gv.square()  # (B, H, W)
    d2 = g2.clone()
    hole_rows = (~known).any(0).any(1).nonzero()
    if reach == 0 or hole_rows.numel() == 0:
        return d2.unsqueeze(1)
    # Only rows and columns that hold a hole pixel (in any sample) change; they look `reach` columns aside.
    hole_cols = (~known).any(0).any(0).nonzero()
    r0, r1 = int(hole_rows[0]), int(hole_rows[-1]) + 1
    c0, c1 = int(hole_cols[0]), int(hole_cols[-1]) + 1
    W = g2.shape[-1]
    reach = min(reach, W - 1)
    lo, hi = max(0, c0 - reach), min(W, c1 + reach)
    src = F.pad(g2[:, r0:r1, lo:hi], (reach - (c0 - lo), reach - (hi - c1)), value=float("inf"))
    out = d2[:, r0:r1, c0:c1].contiguous()  # src column j + reach <-> out column j
    n = c1 - c0
    for k in range(1, reach + 1):
        kk = float(k * k)
        torch.minimum(out, src[:, :, reach + k:reach + k + n] + kk, out=out)  # neighbour k to the right
        torch.minimum(out, src[:, :, reach - k:reach - k + n] + kk, out=out)  # neighbour k to the left
    d2[:, r0:r1, c0:c1] = out
    return d2.unsqueeze(1)


def spatial_discount(mask: torch.Tensor, gamma: float = 0.9) -> torch.Tensor:
    """Spatially discounted reconstruction weights (paper, section 3.1): gamma ** l, l = Euclidean distance
    from the pixel to the nearest known pixel.

    mask (B,1,H,W) (float or bool), 1 = hole. Returns float32 (B,1,H,W) on mask's device: in (0, 1) at hole
    pixels (gamma at a hole pixel next to a known one), exactly 1 at known pixels (distance 0). A sample with
    no known pixel at all gets weight 1 everywhere (no distance is defined).
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B,1,H,W), got {tuple(mask.shape)}")
    d = squared_distance_to_known(mask.float()).sqrt()
    w = torch.pow(torch.tensor(float(gamma), device=mask.device), d)
    return torch.where(torch.isfinite(d), w, torch.ones_like(w))


def _hole_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of err (B,C,H,W) over hole pixels and channels."""
    return (err * mask).sum() / (mask.sum() * err.shape[1]).clamp_min(1.0)


def l1_loss(gt, coarse, refined, mask, weight=None, *, coarse_alpha: float = 1.2, gamma: float = 0.9):
    """Spatially discounted L1 over hole pixels:
    coarse_alpha * mean_hole(|gt - coarse| * w) + mean_hole(|gt - refined| * w).

    gt, coarse, refined (B,3,H,W) in [-1,1]; mask (B,1,H,W) 1 = hole; weight (B,1,H,W) from spatial_discount
    (computed from mask with gamma when None). Returns a scalar."""
    if weight is None:
        weight = spatial_discount(mask, gamma).to(gt.dtype)
    mask = mask.to(gt.dtype)
    return (coarse_alpha * _hole_mean((gt - coarse).abs() * weight, mask)
            + _hole_mean((gt - refined).abs() * weight, mask))


def ae_loss(gt, coarse, refined, mask, *, coarse_alpha: float = 1.2):
    """Auto-encoder L1 over known pixels, normalised by their fraction (TF release):
    [coarse_alpha * mean(|gt - coarse| * (1-m)) + mean(|gt - refined| * (1-m))] / mean(1-m). Scalar."""
    known = 1 - mask.to(gt.dtype)
    frac = known.mean().clamp_min(1e-8)
    return (coarse_alpha * ((gt - coarse).abs() * known).mean() + ((gt - refined).abs() * known).mean()) / frac


def critic_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss mean(D(fake)) - mean(D(real)) (to minimise). d_*: (B,1) critic scores."""
    return d_fake.mean() - d_real.mean()


def generator_adv_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss -mean(D(fake)). d_fake: (B,1)."""
    return -d_fake.mean()


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WGAN-GP over hole pixels: mean over samples of (||dD/dx * mask||_2 - 1)^2 at x = real + a (fake - real),
    a ~ U(0,1) per sample.

    real, fake (B,3,H,W) (fake may carry a graph; it is detached here); mask (B,1,H,W), 1 = hole (broadcast over
    channels). The penalty's graph reaches the critic's parameters (create_graph=True). Scalar."""
    real, fake = real.detach(), fake.detach()
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x = (real + alpha * (fake - real)).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    grad = grad * mask.to(grad.dtype)
    slopes = (grad.square().flatten(1).sum(1) + 1e-12).sqrt()  # (B,)
    return (slopes - 1).square().mean()


def dcgan_critic_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """DCGAN discriminator loss, cross-entropy on logits with real -> 1 and fake -> 0:
    mean(softplus(-D(real))) + mean(softplus(D(fake))) = BCE(sigmoid(D(real)), 1) + BCE(sigmoid(D(fake)), 0).
    d_*: (B,1) logits. Scalar."""
    return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))


def dcgan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """DCGAN non-saturating generator loss, BCE with fake -> 1: mean(softplus(-D(fake))). d_fake (B,1) logits."""
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


def lsgan_critic_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """LSGAN discriminator loss (targets real 1, fake 0): 0.5 * mean((D(real) - 1)^2) + 0.5 * mean(D(fake)^2).
    d_*: (B,1). Scalar."""
    return 0.5 * (d_real - 1).square().mean() + 0.5 * d_fake.square().mean()


def lsgan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """LSGAN generator loss (target 1): 0.5 * mean((D(fake) - 1)^2). d_fake (B,1). Scalar."""
    return 0.5 * (d_fake - 1).square().mean()


@dataclass(frozen=True)
class GanLoss:
    """One GAN objective, as the critic step and the generator step use it (``models.gan``).

    critic(d_real, d_fake) -> scalar to minimise over the critic; generator(d_fake) -> scalar to minimise over
    the generator; d_*: (B,1) critic outputs. gradient_penalty: whether the critic step adds
    ``gan.gp_weight * gradient_penalty`` (WGAN-GP only).
    """

    name: str
    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator: Callable[[torch.Tensor], torch.Tensor]
    gradient_penalty: bool


GAN_LOSSES = ("wgan_gp", "dcgan", "lsgan")


def gan_loss(name: str) -> GanLoss:
    """The GAN objective called ``name`` (the ``gan.loss`` option):
    - "wgan_gp": WGAN with gradient penalty, DeepFill v1 (``critic_loss``, ``generator_adv_loss``);
    - "dcgan": non-saturating cross-entropy on logits (``dcgan_critic_loss``, ``dcgan_generator_loss``);
    - "lsgan": least squares with targets 1 / 0 (``lsgan_critic_loss``, ``lsgan_generator_loss``).
    DCGAN and LSGAN take no gradient penalty."""
    if name == "wgan_gp":
        return GanLoss("wgan_gp", critic_loss, generator_adv_loss, gradient_penalty=True)
    if name == "dcgan":
        return GanLoss("dcgan", dcgan_critic_loss, dcgan_generator_loss, gradient_penalty=False)
    if name == "lsgan":
        return GanLoss("lsgan", lsgan_critic_loss, lsgan_generator_loss, gradient_penalty=False)
    raise ValueError(f"unknown gan.loss {name!r}: expected one of {', '.join(GAN_LOSSES)}")
