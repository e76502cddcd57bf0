"""models.metrics against hand calculations on tiny images, and SSIM against scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import metrics


def _tiny():
    # 2x2 RGB ground truth and prediction; differences chosen so the sums are easy by hand
    y = np.zeros((2, 2, 3), np.float64)
    x = y.copy()
    x[0, 0] = 0.5  # pixel (0,0) off by 0.5 in all three channels
    x[1, 1, 0] = 0.25  # pixel (1,1) off by 0.25 in channel 0 only
    mask = np.array([[1, 0], [0, 0]], np.uint8)  # hole = pixel (0,0)
    return x, y, mask


def test_l1_l2_whole_and_hole_by_hand():
    x, y, mask = _tiny()
    # whole: 12 values, abs errors 3 * 0.5 + 0.25 = 1.75
    assert metrics.l1(x, y) == pytest.approx(1.75 / 12)
    assert metrics.l2(x, y) == pytest.approx((3 * 0.25 + 0.0625) / 12)
    # hole: only pixel (0,0), three channels each 0.5 off
    assert metrics.l1(x, y, mask) == pytest.approx(0.5)
    assert metrics.l2(x, y, mask) == pytest.approx(0.25)
    assert metrics.l1(x, y, mask[..., None]) == pytest.approx(0.5)


def test_uint8_and_float_and_torch_agree():
    x, y, mask = _tiny()
    xu, yu = (x * 255).round().astype(np.uint8), (y * 255).round().astype(np.uint8)
    # 0.5 * 255 rounds to 128, 0.25 * 255 rounds to 64
    assert metrics.l1(xu, yu) == pytest.approx((3 * 128 + 64) / 255 / 12)
    assert metrics.l1(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(metrics.l1(x, y))


def test_psnr_by_hand():
    y = np.zeros((4, 4, 3), np.uint8)
    x = np.full((4, 4, 3), 51, np.uint8)  # 51 / 255 = 0.2 everywhere -> mse 0.04
    assert metrics.psnr(x, y) == pytest.approx(10 * math.log10(1 / 0.04))
    assert metrics.psnr(x, x) == math.inf
    mask = np.zeros((4, 4), np.uint8)
    assert math.isnan(metrics.l1(x, y, mask))  # empty hole -> NaN


def test_batch_returns_one_value_per_image():
    x, y, mask = _tiny()
    xb, yb = np.stack([x, y]), np.stack([y, y])
    out = metrics.l1(xb, yb)
    assert out.shape == (2,)
    assert out[0] == pytest.approx(1.75 / 12) and out[1] == 0
    hole = metrics.l1(xb, yb, np.stack([mask, mask]))
    assert hole[0] == pytest.approx(0.5) and hole[1] == 0


def test_tv_by_hand():
    # one channel, 2x3: rows [0, 1, 1], [0, 0, 1]
    img = np.array([[0, 1, 1], [0, 0, 1]], np.float64)[..., None]
    # horizontal diffs: |1-0|,|1-1|,|0-0|,|1-0| -> mean 2/4; vertical: |0-0|,|0-1|,|1-1| -> mean 1/3
    assert metrics.tv(img) == pytest.approx(0.5 + 1 / 3)
    assert metrics.tv(np.zeros((5, 5, 3))) == 0


def test_ssim_constant_images_by_hand():
    # constant images: variances 0, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1) * C2 / C2
    a, b = 0.5, 0.25
    x, y = np.full((12, 13, 3), a), np.full((12, 13, 3), b)
    c1 = 0.01**2
    assert metrics.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    y = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    noise = rng.integers(-40, 41, y.shape)
    x = np.clip(y.astype(int) + noise, 0, 255).astype(np.uint8)
    ref = structural_similarity(
        x / 255.0,
        y / 255.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
    )
    ours = metrics.ssim(x, y)
    assert ours == pytest.approx(ref, abs=1e-9)
    assert ours < 0.99  # the noise is visible


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.l1(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        metrics.l1(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), np.zeros((3, 3)))


def test_all_metrics_keys():
    x, y, mask = _tiny()
    x = np.pad(x, ((0, 10), (0, 10), (0, 0)))
    y = np.pad(y, ((0, 10), (0, 10), (0, 0)))
    mask = np.pad(mask, ((0, 10), (0, 10)))
    out = metrics.all_metrics(x, y, mask)
    assert set(out) == {"l1", "l2", "psnr", "ssim", "tv", "l1_hole", "l2_hole", "psnr_hole"}
    assert out["l1_hole"] == pytest.approx(0.5)
