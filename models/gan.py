"""The two GAN updates of DeepFill v1 (WGAN-GP) as plain functions: a critic step and a generator step.

Each takes the networks, its optimiser and one batch, does forward, backward and ``optimizer.step()``, and
returns a dict of float metrics. Nothing here knows about Ray, MLflow or the data pipeline: the training loop
moves batches to the device, calls these (``GanOptions.n_critic`` critic steps per generator step), reports
and checkpoints. ``GanOptions`` is also the ``gan:`` section of the training config, ``LossOptions`` its
``loss:`` section.

The paper's ablations are options, DeepFill v1 by default: ``gan.loss`` (WGAN-GP, DCGAN or LSGAN, from
``models.losses.gan_loss``), ``loss.spatial_discount`` (the discounted or the plain hole L1) and the loss
weights (``gan.l1_weight: 0`` trains without the reconstruction loss in the holes). The baseline without
contextual attention is a generator setting (``models.generator.InpaintGenerator(attention="none")``).

Tensors (every function):
- image: (B, 3, H, W) float in [-1, 1], the ground truth; H and W multiples of 8, the local critic's input
  size at most H and W.
- mask: (B, 1, H, W) float {0, 1}, 1 = hole (per sample).
- weight: (B, 1, H, W) float, the spatial discount gamma ** (distance to the nearest known pixel) inside
  holes (see ``models.losses.spatial_discount``); only the generator step uses it (not at all with
  ``loss.spatial_discount`` false).

DDP: the networks may be wrapped in ``DistributedDataParallel``. The critic step runs the generator unwrapped
under ``no_grad`` (no gradients, nothing to synchronise); the generator step runs the critics unwrapped with
their parameters frozen, so DDP never waits for critic gradients that a generator step does not produce. The
gradient penalty is a double backward (``create_graph=True``), which DDP handles without ``static_graph``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from models import losses
from models.critics import crop_around_holes


@dataclass
class GanOptions:
    """GAN objective, schedule and loss weights (the reference's inpaint.yml: WGAN-GP).

    ``gp_weight`` is used by ``loss: wgan_gp`` only; DCGAN and LSGAN have no gradient penalty and ignore it.
    A generator loss needs a term: l1_weight, ae_weight and gan_weight cannot all be 0.
    """

    loss: Literal["wgan_gp", "dcgan", "lsgan"] = "wgan_gp"  # GAN objective: wgan_gp (DeepFill v1), dcgan
    #    (non-saturating cross-entropy) or lsgan (least squares); dcgan and lsgan ignore gp_weight
    n_critic: int = 5  # critic steps per generator step, each on a fresh batch
    l1_weight: float = 1.2  # weight of the spatially discounted hole L1 in the generator loss
    ae_weight: float = 1.2  # weight of the known-pixel (auto-encoder) L1
    gan_weight: float = 0.001  # weight of the adversarial term -(D_local(fake) + D_global(fake))
    gp_weight: float = 10.0  # weight of the gradient penalty in the critic loss
    coarse_weight: float = 1.2  # weight of the coarse stage inside the L1 and AE losses (refined has 1)

    def __post_init__(self):
        losses.gan_loss(self.loss)  # ValueError naming gan.loss for an unknown objective
        if self.n_critic < 1:
            raise ValueError(f"gan.n_critic must be >= 1, got {self.n_critic}")
        for name in ("l1_weight", "ae_weight", "gan_weight", "gp_weight", "coarse_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"gan.{name} must be >= 0, got {getattr(self, name)}")
        if self.l1_weight == 0 and self.ae_weight == 0 and self.gan_weight == 0:
            raise ValueError("gan.l1_weight, gan.ae_weight and gan.gan_weight are all 0: the generator loss "
                             "would have no term left; keep at least one above 0")


@dataclass
class LossOptions:
    """The generator's reconstruction loss (the ``loss:`` section of the training config)."""

    spatial_discount: bool = True  # weigh the hole L1 by gamma ** (distance to the nearest known pixel)
    #    (DeepFill v1, gamma: masks.gamma); false: the plain mean L1 over hole pixels


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
    """One update of both critics on one batch, with the objective ``gan.loss`` (WGAN-GP by default).

    The generator's refined output is composited into the hole (no gradient to the generator). Each critic
    sees real and fake in one forward pass: the local critic on ``local_size`` crops centred on each sample's
    hole, the global critic on the whole image. Loss = sum over both critics of the objective's critic loss
    (``models.losses.gan_loss``); for WGAN-GP that is ``mean D(fake) - mean D(real) + gan.gp_weight *
    gradient_penalty``, the penalty's slopes taken over hole pixels only and computed in float32 (outside
    autocast). DCGAN and LSGAN add no penalty (``gan.gp_weight`` is unused).

    Returns floats. wgan_gp: ``d_loss`` (the total), ``d_wasserstein`` (mean D(real) - mean D(fake), both
    critics summed: the critics' estimate of the distance, should stay positive and shrink as G improves),
    ``d_gp`` (the two penalties summed, unweighted). dcgan, lsgan: ``d_loss`` (the total), ``d_adv`` (the
    two critic losses summed: the same number, there is no penalty), ``d_gp`` (0.0); no ``d_wasserstein``
    (their critics do not estimate a distance).
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
    objective = losses.gan_loss(gan.loss)
    adv = objective.critic(d_real_local, d_fake_local) + objective.critic(d_real_global, d_fake_global)
    if not objective.gradient_penalty:
        adv.backward()
        optimizer.step()
        return {"d_loss": adv.item(), "d_adv": adv.item(), "d_gp": 0.0}
    gp = (losses.gradient_penalty(local_critic, real_local, fake_local, mask_local)
          + losses.gradient_penalty(global_critic, image, fake, mask))
    loss = adv + gan.gp_weight * gp
    loss.backward()
    optimizer.step()
    return {"d_loss": loss.item(), "d_wasserstein": -adv.item(), "d_gp": gp.item()}


def generator_step(generator: nn.Module, local_critic: nn.Module, global_critic: nn.Module,
                   optimizer: torch.optim.Optimizer, image: torch.Tensor, mask: torch.Tensor,
                   weight: torch.Tensor, *, local_size: int, gan: GanOptions = GanOptions(),
                   loss: LossOptions = LossOptions(), amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One update of the generator on one batch; the critics are frozen and run unwrapped.

    Loss = ``gan.l1_weight * l1 + gan.ae_weight * ae + gan.gan_weight * (g_local + g_global)`` with
    l1 = coarse-weighted spatially discounted L1 over the hole (``loss.spatial_discount`` false: the plain
    L1 over the hole, ``weight`` unused), ae = coarse-weighted L1 over known pixels, g = the objective's
    generator loss on D(composite) for each critic (``gan.loss``; WGAN-GP: -mean D(composite)).

    Returns floats, for every objective: ``g_loss`` (the total), ``g_l1``, ``g_ae``, ``g_adv`` (unweighted
    terms).
    """
    optimizer.zero_grad(set_to_none=True)
    local_plain, global_plain = unwrap(local_critic), unwrap(global_critic)
    with frozen(local_plain, global_plain):
        with _autocast(image.device, amp_dtype):
            coarse, refined, _ = generator(image, mask)
        coarse, refined = coarse.float(), refined.float()  # (B, 3, H, W) each
        if not loss.spatial_discount:
            weight = torch.ones_like(mask)  # (B, 1, H, W): the plain hole L1 (l1_loss's None would discount)
        l1 = losses.l1_loss(image, coarse, refined, mask, weight, coarse_alpha=gan.coarse_weight)
        ae = losses.ae_loss(image, coarse, refined, mask, coarse_alpha=gan.coarse_weight)
        fake = composite(refined, image, mask)  # (B, 3, H, W), gradient flows to the generator
        with _autocast(image.device, amp_dtype):
            d_local = local_plain(crop_around_holes(fake, mask, local_size)).float()  # (B, 1)
            d_global = global_plain(fake).float()  # (B, 1)
        objective = losses.gan_loss(gan.loss)
        adv = objective.generator(d_local) + objective.generator(d_global)
        total = gan.l1_weight * l1 + gan.ae_weight * ae + gan.gan_weight * adv
        total.backward()
    optimizer.step()
    return {"g_loss": total.item(), "g_l1": l1.item(), "g_ae": ae.item(), "g_adv": adv.item()}
