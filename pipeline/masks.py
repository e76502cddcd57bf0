"""Hole masks for training and evaluation, drawn with numpy + OpenCV (no Ray, no torch).

Every mask is ``uint8 (H, W)`` with values {0, 1}, **1 = hole** (pixels the generator must fill),
0 = known. Masks are reproducible: draw them from ``mask_rng(seed, epoch, key)``, which hashes its
arguments with blake2b (Python's ``hash()`` is salted per process and would differ across workers).

Kinds (``MASK_KINDS``):

- ``box``: DeepFill v1's rectangle. At 256x256 a 128x128 box at a uniform position, each of its four sides
  then moved inwards by 0..16 px (holes 96..128 px per side); both the box and the shrink scale with the
  image height / width.
- ``strokes``: DeepFill v2's free-form brush strokes: 1-3 strokes of 4-11 vertices; step length
  ~ N(r, r/2) clipped to [0, 2r] with r = sqrt(H^2 + W^2) / 8; turning angles of 2*pi/5 +- up to 2*pi/15,
  alternating direction; brush width U(12, 40) px at 256 (scaled with the short side); a disc at each
  vertex; the whole mask then flipped left-right and up-down with probability 1/2 each.
- ``mixed``: the union (logical OR) of one ``strokes`` and one ``box`` mask: DeepFill v2's training masks.
- LaMa's evaluation presets ``thin_256``, ``medium_256``, ``thick_256``, ``thin_512``, ``medium_512``,
  ``thick_512`` (parameters below, as published in LaMa's ``configs/data_gen/random_*.yaml``), and
  ``thin`` / ``medium`` / ``thick`` which use the 512 preset when the short side is at least 512 and the
  256 preset otherwise. Presets are defined at their base size; at another size, lengths and widths are
  scaled by ``min(H, W) / base``.

Every kind redraws masks that cover more than ``max_hole_fraction`` (default 0.5, as LaMa drops masks above
50%) or nothing at all; after 100 failed draws it falls back to a ``box`` mask, which never exceeds 25%.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np

MASK_KINDS = (
    "box", "strokes", "mixed", "thin", "medium", "thick",
    "thin_256", "medium_256", "thick_256", "thin_512", "medium_512", "thick_512",
)

MAX_DRAWS = 100


# ---------------------------------------------------------------------------------------------- seeding

def stable_seed(*parts) -> int:
    """A 128-bit integer from the text of ``parts``: the same in every process, on every machine."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def mask_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator for the mask of sample ``key`` in ``epoch`` under base ``seed`` (deterministic)."""
    return np.random.default_rng(stable_seed("mask", int(seed), int(epoch), key))


# ---------------------------------------------------------------------------------------------- v1 / v2

def box_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """DeepFill v1 box: (H, W) uint8, 1 = hole. 128x128 at 256 with each side shrunk by 0..16 px, scaled."""
    sy, sx = height / 256.0, width / 256.0
    box_h = max(1, min(height, round(128 * sy)))
    box_w = max(1, min(width, round(128 * sx)))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    max_dy, max_dx = round(16 * sy), round(16 * sx)
    d_top, d_bottom = (int(v) for v in rng.integers(0, max_dy + 1, size=2))
    d_left, d_right = (int(v) for v in rng.integers(0, max_dx + 1, size=2))
    mask = np.zeros((height, width), np.uint8)
    y0, y1 = top + d_top, max(top + d_top + 1, top + box_h - d_bottom)
    x0, x1 = left + d_left, max(left + d_left + 1, left + box_w - d_right)
    mask[y0:y1, x0:x1] = 1
    return mask


def _clip(v: float, lo: float, hi: float) -> float:
    """np.clip for one Python float, without numpy's per-call overhead (~5 us, a few hundred calls a mask)."""
    return float(min(max(v, lo), hi))


def stroke_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """DeepFill v2 free-form brush strokes: (H, W) uint8, 1 = hole."""
    mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
    scale = min(height, width) / 256.0
    min_w, max_w = 12 * scale, 40 * scale
    avg_radius = math.sqrt(height**2 + width**2) / 8
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):  # 1..3 strokes
        n_vertex = int(rng.integers(4, 12))  # 4..11 vertices
        angle_min = mean_angle - rng.uniform(0, angle_range)
        angle_max = mean_angle + rng.uniform(0, angle_range)
        brush = max(1, int(rng.uniform(min_w, max_w)))
        x, y = float(rng.integers(0, width)), float(rng.integers(0, height))
        points = [(int(x), int(y))]
        for i in range(n_vertex - 1):
            angle = rng.uniform(angle_min, angle_max)
            if i % 2 == 0:
                angle = 2 * math.pi - angle  # alternate the turning direction
            r = _clip(float(rng.normal(avg_radius, avg_radius / 2)), 0, 2 * avg_radius)
            x = _clip(x + r * math.cos(angle), 0, width - 1)
            y = _clip(y + r * math.sin(angle), 0, height - 1)
            points.append((int(x), int(y)))
        for p, q in zip(points[:-1], points[1:]):
            cv2.line(mask, p, q, 1, thickness=brush)
        for p in points:
            cv2.circle(mask, p, brush // 2, 1, thickness=-1)
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    if rng.random() < 0.5:
        mask = mask[::-1, :]
    return np.ascontiguousarray(mask)


# ---------------------------------------------------------------------------------------------- LaMa presets

@dataclass(frozen=True)
class LamaPreset:
    """One of LaMa's evaluation mask presets, in pixels at ``base`` x ``base``.

    Lines (chosen with weight 1): ``min_times..max_times`` polylines, each of 1..5 segments starting at a
    uniform point; segment angle ``0.01 + U{0..max_angle-1}`` radians (mirrored to ``2*pi - angle`` on
    even polylines), length ``10 + U{0..max_len-1}``, thickness ``5 + U{0..max_width-1}``.
    Boxes (chosen with weight ``box_proba``): ``box_min_times..box_max_times`` rectangles with sides in
    ``[box_min, box_max)`` at least ``margin`` px from the border.
    """

    base: int
    min_times: int
    max_times: int
    max_width: int
    max_len: int
    max_angle: int = 4
    box_proba: float = 0.0
    margin: int = 0
    box_min: int = 0
    box_max: int = 0
    box_min_times: int = 1
    box_max_times: int = 1


LAMA_PRESETS = {
    "thin_256": LamaPreset(256, min_times=4, max_times=50, max_width=10, max_len=40),
    "medium_256": LamaPreset(256, min_times=4, max_times=5, max_width=50, max_len=100, box_proba=0.3,
                             margin=0, box_min=10, box_max=50, box_min_times=1, box_max_times=5),
    "thick_256": LamaPreset(256, min_times=1, max_times=5, max_width=100, max_len=200, box_proba=0.3,
                            margin=10, box_min=30, box_max=150, box_min_times=1, box_max_times=3),
    "thin_512": LamaPreset(512, min_times=4, max_times=70, max_width=20, max_len=100),
    "medium_512": LamaPreset(512, min_times=4, max_times=10, max_width=100, max_len=200, box_proba=0.3,
                             margin=0, box_min=30, box_max=150, box_min_times=1, box_max_times=5),
    "thick_512": LamaPreset(512, min_times=1, max_times=5, max_width=250, max_len=450, box_proba=0.3,
                            margin=10, box_min=30, box_max=300, box_min_times=1, box_max_times=4),
}


def lama_mask(preset: LamaPreset, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A mask from one LaMa preset: (H, W) uint8, 1 = hole."""
    s = min(height, width) / preset.base
    mask = np.zeros((height, width), np.uint8)
    if rng.random() < preset.box_proba / (1.0 + preset.box_proba):
        margin = round(preset.margin * s)
        lo = max(1, round(preset.box_min * s))
        hi = min(round(preset.box_max * s), height - 2 * margin, width - 2 * margin)
        hi = max(hi, lo + 1)
        for _ in range(int(rng.integers(preset.box_min_times, preset.box_max_times + 1))):
            bw, bh = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
            x0 = int(rng.integers(margin, max(margin, width - margin - bw) + 1))
            y0 = int(rng.integers(margin, max(margin, height - margin - bh) + 1))
            mask[y0:y0 + bh, x0:x0 + bw] = 1
        return mask
    max_len = max(1, round(preset.max_len * s))
    max_width = max(1, round(preset.max_width * s))
    for i in range(int(rng.integers(preset.min_times, preset.max_times + 1))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        for _ in range(1 + int(rng.integers(0, 5))):
            angle = 0.01 + int(rng.integers(0, preset.max_angle))
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            length = 10 * s + int(rng.integers(0, max_len))
            thickness = max(1, round(5 * s) + int(rng.integers(0, max_width)))
            x1 = int(_clip(x + length * math.sin(angle), 0, width))
            y1 = int(_clip(y + length * math.cos(angle), 0, height))
            cv2.line(mask, (x, y), (x1, y1), 1, thickness=thickness)
            x, y = x1, y1
    return mask


# ---------------------------------------------------------------------------------------------- factory

def _draw(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "box":
        return box_mask(height, width, rng)
    if kind == "strokes":
        return stroke_mask(height, width, rng)
    if kind == "mixed":
        return stroke_mask(height, width, rng) | box_mask(height, width, rng)
    if kind in ("thin", "medium", "thick"):
        base = 512 if min(height, width) >= 512 else 256
        return lama_mask(LAMA_PRESETS[f"{kind}_{base}"], height, width, rng)
    if kind in LAMA_PRESETS:
        return lama_mask(LAMA_PRESETS[kind], height, width, rng)
    raise ValueError(f"unknown mask kind {kind!r}; known kinds: {', '.join(MASK_KINDS)}")


def generate_mask(kind: str, height: int, width: int, rng: np.random.Generator, *,
                  max_hole_fraction: float = 0.5) -> np.ndarray:
    """Draw one mask of ``kind``: (H, W) uint8 in {0, 1}, 1 = hole, hole fraction in (0, max_hole_fraction]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; known kinds: {', '.join(MASK_KINDS)}")
    limit = max_hole_fraction * height * width
    for _ in range(MAX_DRAWS):
        mask = _draw(kind, height, width, rng)
        holes = int(mask.sum())
        if 0 < holes <= limit:
            return mask
    return box_mask(height, width, rng)


# ---------------------------------------------------------------------------------------------- loss weights

def loss_weights(mask: np.ndarray, gamma: float = 0.9) -> np.ndarray:
    """Spatially discounted reconstruction weights: (H, W) float32.

    ``mask`` (H, W) uint8, 1 = hole. A hole pixel gets ``gamma ** d`` with d the exact Euclidean distance
    (in pixels) to the nearest known pixel (so a hole pixel next to a known one gets ``gamma``); known pixels
    get 1. A mask with no known pixel at all gets 1 everywhere (no distance is defined).

    Same values as ``models.losses.spatial_discount`` (a test checks it); this OpenCV version is the one the
    data workers run, being several times faster per mask than the torch one on a CPU.
    """
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"loss_weights expects an (H, W) mask, got shape {mask.shape}")
    weights = np.ones(mask.shape, np.float32)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or mask.min() > 0:  # no hole, or no known pixel: 1 everywhere
        return weights
    # Only the holes' bounding box plus a 1-pixel ring needs the distance transform: every pixel outside
    # the box is known, and the nearest one to a hole pixel is never farther than the ring.
    y0, y1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, mask.shape[0])
    x0, x1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, mask.shape[1])
    dist = cv2.distanceTransform(mask[y0:y1, x0:x1], cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # 0 on known pixels
    # OpenCV's float result can differ in the last bit from call to call; squared distances between pixel
    # centres are integers, so rounding them makes the weights exact and bit-for-bit repeatable, and a
    # table over the integer squared distances replaces a power per pixel.
    # In float32 the squared distance is within ~4e-7 * d2 of its integer: below 512**2 rounding it is
    # exact, and twice as fast as in float64 (which holes farther than 512 px from known pixels use).
    if float(dist.max()) < 512.0:
        d2 = (dist * dist + np.float32(0.5)).astype(np.int32)
    else:
        d2 = np.rint(np.square(dist, dtype=np.float64)).astype(np.int64)
    table = np.sqrt(np.arange(int(d2.max()) + 1, dtype=np.float64)).astype(np.float32)
    table = np.power(np.float32(gamma), table, dtype=np.float32)
    weights[y0:y1, x0:x1] = np.take(table, d2)
    return weights
