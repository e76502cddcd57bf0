"""Training augmentation (albumentations 2): resize-up of small images, random crop, flip, mild jitter.

Seeding: albumentations' ``Compose`` owns a generator; two Compose objects with the same seed produce the
same sequence, so a cluster of workers seeded alike would augment identically. We instead reseed the
pipeline for every sample from ``augment_seed(seed, epoch, key)`` (a blake2b hash), so each sample's crop
differs across epochs and workers yet repeats exactly for the same (seed, epoch, key).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from pipeline.masks import stable_seed


def augment_seed(seed: int, epoch: int, key: str) -> int:
    """A 32-bit seed for the augmentation of sample ``key`` in ``epoch`` (independent of the mask's)."""
    return stable_seed("augment", int(seed), int(epoch), key) % (2**32)


class Augmenter:
    """``(H, W, 3) uint8 image -> (crop, crop, 3) uint8``, reproducible for a given seed.

    Images whose short side is below ``crop_size`` are first resized up (bilinear) so the short side equals
    it (aspect ratio kept); larger images are not resized. Then a uniform random ``crop_size`` square crop,
    a horizontal flip with probability 1/2 (if ``flip``), and with ``color_jitter`` > 0 a brightness /
    contrast / saturation jitter of +-color_jitter with probability 0.8 (no hue shift).
    """

    def __init__(self, crop_size: int, *, flip: bool = True, color_jitter: float = 0.0):
        cv2.setNumThreads(1)  # one task = one core; OpenCV's own pool only oversubscribes the CPU
        self.crop_size = int(crop_size)
        tail: list = [A.RandomCrop(height=self.crop_size, width=self.crop_size)]
        if flip:
            tail.append(A.HorizontalFlip(p=0.5))
        if color_jitter > 0:
            j = float(color_jitter)
            tail.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=0.8))
        self._plain = A.Compose(tail)
        self._upsize = A.Compose([A.SmallestMaxSize(max_size=self.crop_size, interpolation=cv2.INTER_LINEAR), *tail])

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"Augmenter expects (H, W, 3) uint8, got {image.dtype} {image.shape}")
        compose = self._upsize if min(image.shape[:2]) < self.crop_size else self._plain
        compose.set_random_seed(int(seed) % (2**32))
        out = compose(image=image)["image"]
        return np.ascontiguousarray(out)


def center_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """Deterministic crop for validation: resize up if the short side is below ``crop_size`` (bilinear,
    aspect kept), then the central ``crop_size`` square. (H, W, 3) uint8 -> (crop, crop, 3) uint8."""
    h, w = image.shape[:2]
    if min(h, w) < crop_size:
        scale = crop_size / min(h, w)
        nh, nw = max(crop_size, round(h * scale)), max(crop_size, round(w * scale))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        h, w = nh, nw
    top, left = (h - crop_size) // 2, (w - crop_size) // 2
    return np.ascontiguousarray(image[top:top + crop_size, left:left + crop_size])
