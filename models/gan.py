"""The two WGAN-GP updates of DeepFill v1 as plain functions: a critic step and a generator step.

Each takes the networks, its optimiser and one batch, does forward, backward and ``optimizer.step()``, and
returns a dict of float metrics. Nothing here knows about Ray, MLflow or the data pipeline: the training loop
moves batches to the device, calls these (``GanOptions.n_critic`` critic steps per generator step), reports
and checkpoints. ``GanOptions`` is also the ``gan:`` section of the training config.

Tensors (every function):
- image: (B, 3, H, W) float in [-1, 1], the ground truth; H and W multiples of 8, the local critic's input
  size at most H and W.
- mask: (B, 1, H, W) float {0, 1}, 1 = hole (per sample).
- weight: (B, 1, H, W) float, the spatial discount gamma ** (distance to the nearest known pixel) inside
  holes (see ``models.losses.spatial_discount``); only the generator step uses it.

DDP: the networks may be wrapped in ``DistributedDataParallel``. The critic step runs the generator unwrapped
under ``no_grad`` (no gradients, nothing to synchronise); the generator step runs the critics unwrapped with
their parameters frozen, so DDP never waits for critic gradients that a generator step does not produce. The
gradient penalty is a double backward (``create_graph=True``), which DDP handles without ``static_graph``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from models import losses
from models.critics import crop_around_holes


@dataclass
class GanOptions:
    """WGAN-GP schedule and loss weights (the reference's inpaint.yml)."""

    n_critic: int = 5  # critic steps per generator step, each on a fresh batch
    l1_weight: float = 1.2  # weight of the spatially discounted hole L1 in the generator loss
    ae_weight: float = 1.2  # weight of the known-pixel (auto-encoder) L1
    gan_weight: float = 0.001  # weight of the adversarial term -(D_local(fake) + D_global(fake))
    gp_weight: float = 10.0  # weight of the gradient penalty in the critic loss
    coarse_weight: float = 1.2  # weight of the coarse stage inside the L1 and AE losses (refined has 1)

    def __post_init__(self):
        if self.n_critic < 1:
            raise ValueError(f"gan.n_critic must be >= 1, got {self.n_critic}")
        for name in ("l1_weight", "ae_weight", "gan_weight", "gp_weight", "coarse_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"gan.{name} must be >= 0, got {getattr(self, name)}")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device`` when ``dtype`` is given, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Parameters of ``modules`` do not require grad inside the block (restored afterwards)."""
    params = [p for m in modules for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def composite(output: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Generated pixels in the hole, known pixels elsewhere: (B, 3, H, W) in [-1, 1]."""
    return output * mask + image * (1.0 - mask)


def critic_step(generator: nn.Module, local_critic: nn.Module, global_critic: nn.Module,
                optimizer: torch.optim.Optimizer, image: torch.Tensor, mask: torch.Tensor, *,
                local_size: int, gan: GanOptions = GanOptions(),
                amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One update of both critics (WGAN-GP) on one batch.

    The generator's refined output is composited into the hole (no gradient to the generator). Each critic
    sees real and fake in one forward pass: the local critic on ``local_size`` crops centred on each sample's
    hole, the global critic on the whole image. Loss = sum over both critics of
    ``mean D(fake) - mean D(real) + gan.gp_weight * gradient_penalty``; the penalty's slopes are taken over
    hole pixels only and computed in float32 (outside autocast).

    Returns floats: ``d_loss`` (the total), ``d_wasserstein`` (mean D(real) - mean D(fake), both critics
    summed: the critics' estimate of the distance, should stay positive and shrink as G improves),
    ``d_gp`` (the two penalties summed, unweighted).
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), _autocast(image.device, amp_dtype):
        _, refined, _ = unwrap(generator)(image, mask)
    fake = composite(refined.float(), image, mask)  # (B, 3, H, W), no grad

    real_local = crop_around_holes(image, mask, local_size)  # (B, 3, S, S)
    fake_local = crop_around_holes(fake, mask, local_size)  # (B, 3, S, S)
    mask_local = crop_around_holes(mask, mask, local_size)  # (B, 1, S, S)

    with _autocast(image.device, amp_dtype):
        d_local = local_critic(torch.cat([real_local, fake_local])).float()  # (2B, 1)
        d_global = global_critic(torch.cat([image, fake])).float()  # (2B, 1)
    d_real_local, d_fake_local = d_local.chunk(2)  # (B, 1) each
    d_real_global, d_fake_global = d_global.chunk(2)
    adv = losses.critic_loss(d_real_local, d_fake_local) + losses.critic_loss(d_real_global, d_fake_global)
    gp = (losses.gradient_penalty(local_critic, real_local, fake_local, mask_local)
          + losses.gradient_penalty(global_critic, image, fake, mask))
    loss = adv + gan.gp_weight * gp
    loss.backward()
    optimizer.step()
    return {"d_loss": loss.item(), "d_wasserstein": -adv.item(), "d_gp": gp.item()}


def generator_step(generator: nn.Module, local_critic: nn.Module, global_critic: nn.Module,
                   optimizer: torch.optim.Optimizer, image: torch.Tensor, mask: torch.Tensor,
                   weight: torch.Tensor, *, local_size: int, gan: GanOptions = GanOptions(),
                   amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One update of the generator on one batch; the critics are frozen and run unwrapped.

    Loss = ``gan.l1_weight * l1 + gan.ae_weight * ae + gan.gan_weight * (g_local + g_global)`` with
    l1 = coarse-weighted spatially discounted L1 over the hole, ae = coarse-weighted L1 over known pixels,
    g = -mean D(composite) for each critic.

    Returns floats: ``g_loss`` (the total), ``g_l1``, ``g_ae``, ``g_adv`` (unweighted terms).
    """
    optimizer.zero_grad(set_to_none=True)
    local_plain, global_plain = unwrap(local_critic), unwrap(global_critic)
    with frozen(local_plain, global_plain):
        with _autocast(image.device, amp_dtype):
            coarse, refined, _ = generator(image, mask)
        coarse, refined = coarse.float(), refined.float()  # (B, 3, H, W) each
        l1 = losses.l1_loss(image, coarse, refined, mask, weight, coarse_alpha=gan.coarse_weight)
        ae = losses.ae_loss(image, coarse, refined, mask, coarse_alpha=gan.coarse_weight)
        fake = composite(refined, image, mask)  # (B, 3, H, W), gradient flows to the generator
        with _autocast(image.device, amp_dtype):
            d_local = local_plain(crop_around_holes(fake, mask, local_size)).float()  # (B, 1)
            d_global = global_plain(fake).float()  # (B, 1)
        adv = losses.generator_adv_loss(d_local) + losses.generator_adv_loss(d_global)
        loss = gan.l1_weight * l1 + gan.ae_weight * ae + gan.gan_weight * adv
        loss.backward()
    optimizer.step()
    return {"g_loss": loss.item(), "g_l1": l1.item(), "g_ae": ae.item(), "g_adv": adv.item()}
