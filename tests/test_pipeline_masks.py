"""pipeline.masks and pipeline.augment: hole fractions per kind, reproducibility across processes, the loss
weight formula (against brute force and models.losses.spatial_discount), seeded augmentation. No Ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from models.losses import spatial_discount
from pipeline.augment import Augmenter, augment_seed, center_crop
from pipeline.masks import MASK_KINDS, box_mask, generate_mask, loss_weights, mask_rng

# (kind, size) -> (lowest allowed mean hole fraction, highest) over 40 masks; every single mask in (0, 0.5]
MEAN_RANGES = {
    "box": (0.14, 0.25), "strokes": (0.05, 0.30), "mixed": (0.18, 0.45),
    "thin": (0.10, 0.45), "medium": (0.08, 0.40), "thick": (0.10, 0.40),
}


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("size", [(64, 64), (256, 256), (96, 160)])
def test_every_kind_is_binary_and_within_half(kind, size):
    h, w = size
    fractions = []
    for i in range(40):
        m = generate_mask(kind, h, w, mask_rng(0, 0, f"img{i}"))
        assert m.dtype == np.uint8 and m.shape == (h, w)
        assert set(np.unique(m)) <= {0, 1}
        fractions.append(m.mean())
    fractions = np.array(fractions)
    assert fractions.min() > 0 and fractions.max() <= 0.5
    lo, hi = MEAN_RANGES[kind.split("_")[0]]
    if h == w:  # the documented ranges are for square crops
        assert lo <= fractions.mean() <= hi, (kind, size, fractions.mean())


def test_box_is_one_v1_rectangle():
    for i in range(50):
        m = box_mask(256, 256, mask_rng(1, 0, str(i)))
        ys, xs = np.nonzero(m)
        hh, ww = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 96 <= hh <= 128 and 96 <= ww <= 128
        assert m.sum() == hh * ww  # one filled rectangle
    m = box_mask(64, 64, mask_rng(1, 0, "small"))  # scaled: 32 px box, shrunk by 0..4 per side
    ys, xs = np.nonzero(m)
    assert 24 <= ys.max() - ys.min() + 1 <= 32 and 24 <= xs.max() - xs.min() + 1 <= 32


def test_masks_repeat_for_the_same_seed_and_differ_otherwise():
    def draw(seed, epoch, key):
        return generate_mask("mixed", 64, 64, mask_rng(seed, epoch, key))

    a = draw(0, 0, "photos/a.jpg")
    assert (a == draw(0, 0, "photos/a.jpg")).all()
    assert not (a == draw(0, 1, "photos/a.jpg")).all()  # next epoch
    assert not (a == draw(0, 0, "photos/b.jpg")).all()  # other sample
    assert not (a == draw(1, 0, "photos/a.jpg")).all()  # other seed


def test_mask_rng_is_stable_across_processes():
    """Python's hash() is salted per process; mask_rng must not depend on it."""
    code = ("from pipeline.masks import generate_mask, mask_rng;"
            "print(generate_mask('strokes', 32, 32, mask_rng(3, 2, 'k/x.png')).tobytes().hex())")
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout.strip()
        for s in (1, 2)
    }
    assert outs == {generate_mask("strokes", 32, 32, mask_rng(3, 2, "k/x.png")).tobytes().hex()}


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown mask kind"):
        generate_mask("blob", 32, 32, mask_rng(0, 0, "k"))


def _brute_force_weights(mask, gamma):
    hole = np.argwhere(mask == 1)
    known = np.argwhere(mask == 0)
    w = np.ones(mask.shape, np.float64)
    for y, x in hole:
        d = np.sqrt(((known - (y, x)) ** 2).sum(1)).min()
        w[y, x] = gamma**d
    return w


def test_loss_weights_match_the_formula():
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 24), np.uint8)
    mask[3:15, 4:20] = 1
    mask[rng.random(mask.shape) < 0.05] = 1
    w = loss_weights(mask, 0.9)
    assert w.dtype == np.float32 and w.shape == mask.shape
    np.testing.assert_allclose(w, _brute_force_weights(mask, 0.9), rtol=1e-5)
    assert (w[mask == 0] == 1).all() and (w[mask == 1] <= 0.9 + 1e-6).all()
    big = generate_mask("thick", 64, 64, mask_rng(0, -1, "k"))
    first = loss_weights(big, 0.9)
    assert all((loss_weights(big, 0.9) == first).all() for _ in range(20))  # bit-for-bit repeatable


def test_loss_weights_of_holes_at_the_border_and_in_a_corner():
    """The distance transform runs on the holes' bounding box plus a ring: holes touching the border, a
    corner, or spanning the image must still get the exact distances."""
    cases = []
    for rows, cols in [(slice(0, 9), slice(0, 12)), (slice(5, 20), slice(14, 24)), (slice(0, 20), slice(3, 7)),
                       (slice(2, 3), slice(0, 24)), (slice(0, 20), slice(0, 23))]:
        m = np.zeros((20, 24), np.uint8)
        m[rows, cols] = 1
        cases.append(m)
    rng = np.random.default_rng(3)
    cases.append((rng.random((20, 24)) < 0.6).astype(np.uint8))
    for m in cases:
        np.testing.assert_allclose(loss_weights(m, 0.9), _brute_force_weights(m, 0.9), rtol=1e-5)


@pytest.mark.parametrize("rows", [300, 700])
def test_loss_weights_exact_near_and_far_from_known_pixels(rows):
    """Only row 0 is known, so pixel (i, j) is exactly i px from it: gamma ** i, bit for bit, both where the
    squared distances are rounded in float32 (below 512 px) and in float64 (beyond)."""
    mask = np.ones((rows, 6), np.uint8)
    mask[0] = 0
    w = loss_weights(mask, 0.999)
    expected = np.power(np.float32(0.999), np.arange(rows, dtype=np.float32))[:, None]
    np.testing.assert_array_equal(w, np.broadcast_to(expected, mask.shape))


def test_loss_weights_agree_with_models_spatial_discount():
    masks = [generate_mask(kind, 64, 48, mask_rng(0, 0, kind)) for kind in ("box", "strokes", "mixed", "thick")]
    masks.append(np.ones((16, 16), np.uint8))  # no known pixel
    masks.append(np.zeros((16, 16), np.uint8))  # no hole
    for m in masks:
        ours = loss_weights(m, 0.8)
        theirs = spatial_discount(torch.from_numpy(m)[None, None].float(), 0.8)[0, 0].numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_augmenter_is_seeded_crops_and_resizes_up():
    img = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    aug = Augmenter(64, flip=True, color_jitter=0.1)
    a = aug(img, augment_seed(0, 0, "k"))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert (a == aug(img, augment_seed(0, 0, "k"))).all()
    others = [aug(img, augment_seed(0, e, "k")) for e in range(1, 6)]
    assert any(not (a == o).all() for o in others)
    small = img[:40, :50]
    up = Augmenter(64, flip=False)(small, 1)
    assert up.shape == (64, 64, 3)
    # no flip, no jitter: a crop of the unchanged image is a window of the original
    plain = Augmenter(64, flip=False)(img, 7)
    found = any((img[y:y + 64, x:x + 64] == plain).all() for y in range(100 - 63) for x in range(150 - 63))
    assert found
    c = center_crop(img, 64)
    assert (c == img[18:82, 43:107]).all()
    assert center_crop(small, 64).shape == (64, 64, 3)
