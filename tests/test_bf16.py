"""bf16 autocast on CPU, against float32 from the same weights and the same batch (no GPU needed).

What the training job runs under ``optim.bf16`` on CUDA (``torch.autocast(dtype=torch.bfloat16)`` inside
``models.gan.critic_step`` / ``generator_step``) is run here under CPU autocast, which casts the same ops
(convolutions, linear, matmuls) to bf16: one critic step and one generator step from identical weights, batch
and random state in float32 and in bf16; the gradient penalty's double backward; the contextual attention's
masked softmax; and inference (``models.inpaint`` / ``inpaint_uint8`` inside autocast: they have no amp
option, wrapping them is enough).

Tiny networks (cnum 8, 64x64, batch 2), drawn with a variance-preserving init (``_init``): PyTorch's default
init shrinks the activations layer after layer, and the 40-layer generator then paints a near-constant that
would hide any bf16 error. Tolerances are the worst of 8 seeds (``_measure_step`` / ``_measure_inpaint`` with
seeds 0-7, on this x86 CPU, one thread) with a margin of about 2x; the measured worst is written next to each.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import models
from models.attention import ContextualAttention
from models.gan import critic_step, generator_step

S, B, CNUM = 64, 2, 8  # image side, batch, generator cnum (critics: cnum 8 too)
BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Relative difference |bf16 - fp32| / |fp32| of each loss of one step (worst of seeds 0-7 in the comment).
# d_wasserstein and g_adv are differences of near-equal critic scores (the composite equals the real image
# outside the hole): their relative error says little, so they get an absolute bound.
LOSS_RTOL = {
    "d_loss": 0.02,  # measured 9.0e-3
    "d_gp": 0.02,  # 9.0e-3 (the penalty runs in float32; it differs through the bf16 generator's fake)
    "g_loss": 3e-3,  # 1.2e-3
    "g_l1": 4e-3,  # 1.6e-3
    "g_ae": 3e-3,  # 1.0e-3
}
LOSS_ATOL = {
    "d_wasserstein": 5e-3,  # measured 1.8e-3 (values -0.14 to 0.2)
    "g_adv": 8e-3,  # 3.5e-3 (values -0.22 to 0.09)
}
# ||bf16 - fp32|| / ||fp32|| over all parameters of one side.
GRAD_RTOL = {
    # The critics' gradient of mean D(fake) - mean D(real) is the difference of two nearly equal gradients
    # (fake = real outside the hole), which magnifies the bf16 error of each: 5-10% for that term alone on
    # identical inputs; with the float32 penalty and the bf16 generator's fake, 13.6% in all.
    "critics": 0.3,
    "generator": 0.12,  # 5.3e-2
}
# Adam's first update is about -lr * sign(grad): its relative difference counts the parameters whose gradient
# sign flips (near-zero gradients); random signs would give 1.41, a sign-exact update 0.
UPDATE_RTOL = {"critics": 0.6, "generator": 0.5}  # measured 0.36 and 0.28
# Inference, hole pixels, [-1, 1] units: max |bf16 - fp32| and the mean; uint8: max levels. Known pixels: exact.
HOLE_ATOL, HOLE_MEAN_ATOL = 0.08, 0.01  # measured 3.6e-2 (4.6 uint8 levels) and 4.6e-3
HOLE_UINT8_LEVELS = 8  # measured 4
# The gradient penalty called inside bf16 autocast (critic_step keeps it outside, in float32).
GP_RTOL, GP_GRAD_RTOL = 0.03, 0.35  # measured 9.5e-3 and 0.175


def _init(net: nn.Module, gain: float = 1.2) -> nn.Module:
    """Normal weights of std gain / sqrt(fan_in), zero biases: activations keep their scale through depth."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain / math.sqrt(m.weight[0].numel()))
            nn.init.zeros_(m.bias)
    return net


def _nets(seed: int):
    torch.manual_seed(seed)
    return (_init(models.InpaintGenerator(cnum=CNUM)), _init(models.local_critic(8, S // 2)),
            _init(models.global_critic(8, S)))


def _batch(seed: int):
    """image (B,3,S,S) smooth + noise in [-1,1], mask (B,1,S,S) one box per sample (1 = hole), weight."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(B, 3, S // 8, S // 8, generator=g) * 2 - 1
    image = nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
    image = (image + 0.1 * torch.randn(B, 3, S, S, generator=g)).clamp(-1, 1)
    mask = torch.zeros(B, 1, S, S)
    mask[0, :, 10:34, 8:30] = 1
    mask[1, :, 30:60, 20:44] = 1
    return image, mask, models.losses.spatial_discount(mask)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def _rel(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((other - ref).norm() / ref.norm()).item()


def _one_step(nets, data, amp_dtype):
    """One critic step, then one generator step (Adam, the trainer's betas) from copies of nets.
    Returns (metrics, {side: gradient}, {side: update}, {side: parameters after})."""
    gen, local, glob = (copy.deepcopy(n) for n in nets)
    image, mask, weight = data
    sides = {"critics": list(local.parameters()) + list(glob.parameters()), "generator": list(gen.parameters())}
    opt_d = torch.optim.Adam(sides["critics"], lr=1e-4, betas=(0.5, 0.9))
    opt_g = torch.optim.Adam(sides["generator"], lr=1e-4, betas=(0.5, 0.9))
    before = {k: _flat(p.detach() for p in ps) for k, ps in sides.items()}
    torch.manual_seed(123)  # the penalty's interpolation weights: the same draw in both runs
    metrics = critic_step(gen, local, glob, opt_d, image, mask, local_size=S // 2, amp_dtype=amp_dtype)
    metrics.update(generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=S // 2,
                                  amp_dtype=amp_dtype))
    grads = {k: _flat(p.grad for p in ps) for k, ps in sides.items()}
    after = {k: _flat(p.detach() for p in ps) for k, ps in sides.items()}
    return metrics, grads, {k: after[k] - before[k] for k in sides}, sides


def _measure_step(seed: int = 0) -> dict:
    """The bf16-vs-fp32 differences of one step (the figures the tolerances above bound)."""
    nets, data = _nets(seed), _batch(seed + 100)
    m32, g32, u32, _ = _one_step(nets, data, None)
    m16, g16, u16, p16 = _one_step(nets, data, BF16)
    return {"m32": m32, "m16": m16, "params16": p16,
            "loss_rel": {k: abs(m16[k] - m32[k]) / abs(m32[k]) for k in LOSS_RTOL},
            "loss_abs": {k: abs(m16[k] - m32[k]) for k in LOSS_ATOL},
            "grad_rel": {k: _rel(g32[k], g16[k]) for k in g32},
            "update_rel": {k: _rel(u32[k], u16[k]) for k in u32}}


@pytest.fixture(scope="module")
def step():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_step(0)
    finally:
        torch.set_num_threads(saved)


def test_training_step_under_bf16_is_finite_and_near_float32(step):
    m32, m16 = step["m32"], step["m16"]
    assert set(m16) == set(m32)
    assert all(math.isfinite(v) for v in m16.values()), m16
    assert m16 != m32, "autocast changed nothing: the bf16 path did not run"
    for side, params in step["params16"].items():
        assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in params), side
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params), side
    for k, tol in LOSS_RTOL.items():
        assert step["loss_rel"][k] <= tol, (k, step["loss_rel"][k], m32[k], m16[k])
    for k, tol in LOSS_ATOL.items():
        assert step["loss_abs"][k] <= tol, (k, step["loss_abs"][k], m32[k], m16[k])
    for k, tol in GRAD_RTOL.items():
        assert step["grad_rel"][k] <= tol, ("gradient", k, step["grad_rel"][k])
    for k, tol in UPDATE_RTOL.items():
        assert step["update_rel"][k] <= tol, ("update", k, step["update_rel"][k])


def _penalty(critic, real, fake, mask, amp_dtype):
    critic.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        gp = models.losses.gradient_penalty(critic, real, fake, mask)
    gp.float().backward()  # through the double backward (create_graph=True)
    # the last bias does not move dD/dx: no gradient
    return gp.float().item(), _flat(torch.zeros_like(p) if p.grad is None else p.grad for p in critic.parameters())


def _measure_penalty(seed: int = 0) -> tuple[float, float, float]:
    """(gp fp32, relative gp difference, relative gradient difference) of the global critic's penalty."""
    _, _, glob = _nets(seed)
    image, mask, _ = _batch(seed + 100)
    fake = image * (1 - mask) + mask * torch.rand(image.shape, generator=torch.Generator().manual_seed(seed))
    gp32, grad32 = _penalty(glob, image, fake, mask, None)
    gp16, grad16 = _penalty(glob, image, fake, mask, BF16)
    assert math.isfinite(gp16) and bool(torch.isfinite(grad16).all())
    return gp32, abs(gp16 - gp32) / gp32, _rel(grad32, grad16)


def test_gradient_penalty_double_backward_under_bf16_autocast():
    gp32, gp_rel, grad_rel = _measure_penalty(0)
    assert gp32 > 0
    assert 0 < gp_rel <= GP_RTOL, gp_rel  # > 0: the critic did run in bf16
    assert grad_rel <= GP_GRAD_RTOL, grad_rel


def _features(seed: int = 0):
    """Smooth nonnegative (B, 32, 32, 32) features (a low-resolution field, upsampled, plus a little noise, as
    after the ReLU before the attention), bf16-rounded, and a mask with no valid patch in sample 1."""
    g = torch.Generator().manual_seed(seed)
    low = torch.relu(torch.randn(B, 32, 8, 8, generator=g))
    f = nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    f = torch.relu(f + 0.05 * torch.randn(f.shape, generator=g)).to(BF16)
    mask = torch.zeros(B, 1, 32, 32)
    mask[0, :, 4:16, 6:20] = 1
    mask[1] = 1  # all hole: no valid background patch
    return f, mask


def test_attention_masked_softmax_under_bf16_is_safe_and_matches_in_float32():
    f, mask = _features()
    att = ContextualAttention()  # the generator's settings: rate 2, softmax_scale 10
    with torch.autocast("cpu", dtype=BF16):
        attn = att.attention(f, f, mask)  # (B, 256, 256)
        y, offsets = att(f, f, mask)
    assert attn.dtype == torch.float32 and offsets.dtype == torch.int64 and y.dtype == BF16
    assert bool(torch.isfinite(attn).all()) and bool(torch.isfinite(y.float()).all())
    # sample 0: rows sum to 1, invalid patches (any hole under the 3x3 patch on the 16x16 grid) get exactly 0
    md = nn.functional.max_pool2d(nn.functional.max_pool2d(mask[:1], 2), 3, stride=1, padding=1)
    invalid = md.flatten() > 0.5  # (256,)
    torch.testing.assert_close(attn[0].sum(-1), torch.ones(256), atol=1e-5, rtol=0)
    assert bool((attn[0][:, invalid] == 0).all())
    # sample 1 has no valid patch: zero attention, zero output, zero offsets (the documented fallback)
    assert bool((attn[1] == 0).all()) and bool((y[1] == 0).all()) and bool((offsets[1] == 0).all())
    # the matching and the softmax run in float32: the same attention as float32 features of the same values
    assert torch.equal(attn, att.attention(f.float(), f.float(), mask))
    # and the backward runs under autocast
    fg = f.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y, _ = att(fg, fg, mask)
    y.float().square().sum().backward()
    assert fg.grad.dtype == BF16 and bool(torch.isfinite(fg.grad.float()).all())


def _measure_inpaint(seed: int = 0) -> dict:
    """Inference of one batch inside bf16 autocast against float32: float composites and uint8 results."""
    gen = _nets(seed)[0]
    image, mask, _ = _batch(seed + 100)
    ref = models.inpaint(gen, image, mask)
    with torch.autocast("cpu", dtype=BF16):
        out = models.inpaint(gen, image, mask)
    image8 = models.to_uint8(image).numpy()  # (B, S, S, 3)
    mask8 = mask.permute(0, 2, 3, 1).numpy().astype(np.uint8)  # (B, S, S, 1), 1 = hole
    ref8 = models.inpaint_uint8(gen, image8, mask8)
    with torch.autocast("cpu", dtype=BF16):
        out8 = models.inpaint_uint8(gen, image8, mask8)
    hole = (mask > 0.5).expand_as(image)
    d = (out - ref)[hole].abs()
    known8 = mask8[..., 0] == 0
    return {"image": image, "out": out, "ref": ref, "hole": hole, "image8": image8, "out8": out8, "known8": known8,
            "hole_max": d.max().item(), "hole_mean": d.mean().item(),
            "uint8_max": int(np.abs(out8.astype(int) - ref8.astype(int))[~known8].max())}


def test_inpaint_under_bf16_autocast_keeps_known_pixels_and_nears_float32_in_holes():
    r = _measure_inpaint(0)
    out, image, hole = r["out"], r["image"], r["hole"]
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.equal(out[~hole], image[~hole])  # known pixels: the input, bit for bit
    assert np.array_equal(r["out8"][r["known8"]], r["image8"][r["known8"]])  # uint8: exactly
    assert 0 < r["hole_max"] <= HOLE_ATOL, r["hole_max"]  # > 0: the generator did run in bf16
    assert r["hole_mean"] <= HOLE_MEAN_ATOL, r["hole_mean"]
    assert r["uint8_max"] <= HOLE_UINT8_LEVELS, r["uint8_max"]


def test_inpaint_for_inference_channels_last_under_bf16_autocast():
    gen = models.for_inference(_nets(0)[0])  # the layout the infer job and serving load
    image, mask, _ = _batch(100)
    ref = models.inpaint(gen, image, mask)
    with torch.autocast("cpu", dtype=BF16):
        out = models.inpaint(gen, image, mask)
    hole = (mask > 0.5).expand_as(image)
    assert torch.equal(out[~hole], image[~hole])
    assert (out - ref)[hole].abs().max().item() <= HOLE_ATOL
