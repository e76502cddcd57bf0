"""Image quality metrics for inpainting: L1, L2, PSNR, SSIM and TV.

Conventions shared by every function here:

- Images are channels-last: one image (H, W, C) or a batch (N, H, W, C). numpy arrays or torch tensors.
- Value scale: uint8 images are divided by 255; float images are taken to be in [0, 1] already. Every metric
  is therefore computed on the [0, 1] scale (so a uint8 input and its float copy score the same).
- ``mask`` (optional) selects the hole: (H, W), (H, W, 1), (N, H, W) or (N, H, W, 1), 1 = hole, 0 = known.
  With a mask, L1 / L2 / PSNR average over hole pixels only (all channels); an empty hole gives NaN.
- A single image returns a Python float; a batch returns a float64 array (N,) with one value per image.
  Averages over a data set are means of these per-image values.

Definitions (x = prediction, y = ground truth, both on [0, 1]; means over pixels and channels):

- ``l1``   = mean |x - y|
- ``l2``   = mean (x - y)^2            (the mean squared error; the paper's "l2 loss")
- ``psnr`` = 10 log10(1 / l2)  in dB, data range 1.0 on the [0, 1] scale, which equals PSNR with data
  range 255 on uint8 values; +inf when x == y.
- ``ssim`` = structural similarity of Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5), constants
  K1 = 0.01, K2 = 0.03 with data range 1, population (not sample) covariances, averaged over the window
  positions that fit inside the image ("valid" positions, 5 pixels in from each border) and then over
  channels. Matches ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)``. Needs H, W >= 11.
- ``tv``   = mean |x[i, j+1] - x[i, j]| + mean |x[i+1, j] - x[i, j]|: the mean absolute difference between
  horizontal neighbours plus that between vertical neighbours, over all channels, on [0, 1]. It describes
  one image (no ground truth); multiply by 100 for the paper's "TV %".

Pure numpy (torch tensors are moved to numpy first); float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5), the truncation scikit-image / scipy use: an 11x11 window


def to_unit(x) -> np.ndarray:
    """uint8 image(s) -> float64 / 255; float image(s) -> float64 unchanged (assumed in [0, 1])."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float64)
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")


def _pair(x, y) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both images on [0, 1] as (N, H, W, C) float64, and whether the input was a batch."""
    x, y = to_unit(x), to_unit(y)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if x.ndim == 3:
        return x[None], y[None], False
    if x.ndim == 4:
        return x, y, True
    raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {x.shape}")


def _mask_weights(mask, shape: tuple[int, ...]) -> np.ndarray | None:
    """Hole mask -> float64 (N, H, W, 1) of {0, 1} broadcastable against (N, H, W, C) images."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = (np.asarray(mask) > 0).astype(np.float64)
    n, h, w, _ = shape
    if m.shape in ((h, w), (n, h, w)):
        m = m[..., None]
    if m.ndim == 3:
        m = m[None]  # (1, H, W, 1)
    if m.ndim != 4 or m.shape[1:] != (h, w, 1) or m.shape[0] not in (1, n):
        raise ValueError(f"mask shape {np.shape(mask)} does not fit images of shape {shape}")
    return np.broadcast_to(m, (n, h, w, 1))


def _out(values: np.ndarray, batched: bool):
    return values if batched else float(values[0])


def _mean_error(err: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per-image mean of err (N, H, W, C), over all pixels or over hole pixels only."""
    if weights is None:
        return err.mean(axis=(1, 2, 3))
    c = err.shape[-1]
    total = (err * weights).sum(axis=(1, 2, 3))
    count = weights.sum(axis=(1, 2, 3)) * c
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def l1(x, y, mask=None):
    """Mean absolute error on [0, 1]; over the hole only when ``mask`` (1 = hole) is given."""
    x, y, batched = _pair(x, y)
    return _out(_mean_error(np.abs(x - y), _mask_weights(mask, x.shape)), batched)


def l2(x, y, mask=None):
    """Mean squared error on [0, 1]; over the hole only when ``mask`` (1 = hole) is given."""
    x, y, batched = _pair(x, y)
    return _out(_mean_error((x - y) ** 2, _mask_weights(mask, x.shape)), batched)


def psnr(x, y, mask=None):
    """Peak signal-to-noise ratio in dB, data range 1 on [0, 1] (= 255 on uint8); +inf for identical images."""
    x, y, batched = _pair(x, y)
    mse = _mean_error((x - y) ** 2, _mask_weights(mask, x.shape))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(1.0 / mse)
    return _out(values, batched)


def gaussian_kernel(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Normalised 1-D Gaussian window, float64 (2 * radius + 1,)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (N, H, W, C) with the 1-D window k along H and W."""
    r = len(k)
    h, w = x.shape[1] - r + 1, x.shape[2] - r + 1
    rows = sum(k[i] * x[:, i : i + h] for i in range(r))  # (N, h, W, C)
    return sum(k[i] * rows[:, :, i : i + w] for i in range(r))  # (N, h, w, C)


def ssim(x, y):
    """Mean structural similarity (Wang et al. 2004) per image, in [-1, 1]; see the module docstring."""
    x, y, batched = _pair(x, y)
    k = gaussian_kernel()
    if min(x.shape[1], x.shape[2]) < len(k):
        raise ValueError(f"ssim needs images of at least {len(k)}x{len(k)}, got {x.shape[1]}x{x.shape[2]}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K * data_range)^2 with data_range 1
    mx, my = _filter_valid(x, k), _filter_valid(y, k)
    vx = _filter_valid(x * x, k) - mx * mx
    vy = _filter_valid(y * y, k) - my * my
    cxy = _filter_valid(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # (N, h, w, C)
    per_channel = s.mean(axis=(1, 2))  # (N, C)
    return _out(per_channel.mean(axis=1), batched)


def tv(x):
    """Total variation of one image or a batch on [0, 1]: mean |horizontal diff| + mean |vertical diff|."""
    x = to_unit(x)
    batched = x.ndim == 4
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {x.shape}")
    dh = np.abs(x[:, :, 1:] - x[:, :, :-1]).mean(axis=(1, 2, 3)) if x.shape[2] > 1 else np.zeros(len(x))
    dv = np.abs(x[:, 1:] - x[:, :-1]).mean(axis=(1, 2, 3)) if x.shape[1] > 1 else np.zeros(len(x))
    return _out(dh + dv, batched)


def hole_fraction(mask) -> float:
    """Share of hole pixels (mask > 0) in a mask of any shape."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    return float((m > 0).mean()) if m.size else math.nan


def all_metrics(x, y, mask=None) -> dict[str, float]:
    """Every metric for one (H, W, C) prediction ``x`` against ground truth ``y``; hole variants need ``mask``."""
    out = {
        "l1": l1(x, y),
        "l2": l2(x, y),
        "psnr": psnr(x, y),
        "ssim": ssim(x, y),
        "tv": tv(x),
    }
    if mask is not None:
        out["l1_hole"] = l1(x, y, mask)
        out["l2_hole"] = l2(x, y, mask)
        out["psnr_hole"] = psnr(x, y, mask)
    return out
