"""models.visualize: offsets as colours, masked inputs, nearest upsampling and picture grids (numpy only)."""

import numpy as np
import pytest
import torch

from models import flow_to_image, masked_input, picture_grid, upsample_nearest


def test_flow_to_image():
    off = torch.zeros(2, 2, 4, 5, dtype=torch.int64)
    off[0, 1, 0, 0] = 3  # pointing right
    off[0, 0, 1, 1] = -3  # pointing up
    img = flow_to_image(off)
    assert img.dtype == np.uint8 and img.shape == (2, 4, 5, 3)
    assert (img[1] == 255).all()  # zero offsets are white
    assert img[0, 2, 2].tolist() == [255, 255, 255]
    assert not np.array_equal(img[0, 0, 0], img[0, 1, 1])  # direction changes the hue
    assert np.array_equal(flow_to_image(off.numpy()), img)  # arrays too
    with pytest.raises(ValueError, match=r"offsets must be \(B,2,H,W\)"):
        flow_to_image(off[:, :1])


def test_picture_grid_layout():
    n, h, w = 2, 16, 24
    cols = [np.full((n, h, w, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    attention = np.full((n, h // 4, w // 4, 3), 50, np.uint8)  # offsets live on a coarser grid
    grid = picture_grid([*cols, attention], gap=2)
    assert grid.shape == (2 * h + 2, 5 * w + 8, 3) and grid.dtype == np.uint8
    assert grid[0, 0, 0] == 10 and grid[0, 4 * (w + 2), 0] == 50 and grid[h + 2, 3 * (w + 2), 0] == 40
    assert grid[h, 0, 0] == 255  # the gap between rows


def _tracking_layout(columns, gap):
    """The masked | coarse | refined | truth | attention grid of the training job: attention repeated."""
    n, h, w, _ = columns[0].shape
    tiles = [c.repeat(h // c.shape[1], axis=1).repeat(w // c.shape[2], axis=2) for c in columns]
    grid = np.full((n * h + (n - 1) * gap, len(tiles) * w + (len(tiles) - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        for j, c in enumerate(tiles):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = c[i]
    return grid


def _evaluate_layout(rows, pad):
    """The evaluation report's grid: rows of equal square tiles, `pad` white pixels between and around."""
    s = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            grid[pad + i * (s + pad):pad + i * (s + pad) + s, pad + j * (s + pad):pad + j * (s + pad) + s] = tile
    return grid


def _random_columns(n, h, w, k, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8) for _ in range(k)]


def test_picture_grid_equals_the_training_and_evaluation_layouts():
    columns = _random_columns(3, 16, 24, 4)
    attention = _random_columns(3, 2, 3, 1, seed=1)[0]  # (N, H/8, W/8, 3)
    assert np.array_equal(picture_grid([*columns, attention], gap=2), _tracking_layout([*columns, attention], 2))
    square = _random_columns(3, 20, 20, 5, seed=2)
    rows = [[c[i] for c in square] for i in range(3)]
    grid = picture_grid(square, gap=4, border=4)
    assert grid.shape == (3 * 24 + 4, 5 * 24 + 4, 3)
    assert np.array_equal(grid, _evaluate_layout(rows, 4))
    assert (grid[:4] == 255).all() and (grid[:, -4:] == 255).all()  # the white border


def test_picture_grid_rejects_mismatched_columns():
    a, b = _random_columns(2, 16, 16, 2)
    with pytest.raises(ValueError, match="uint8"):
        picture_grid([a, b.astype(np.float32)])
    with pytest.raises(ValueError, match="uint8"):
        picture_grid([a, b[..., :1]])
    with pytest.raises(ValueError, match="does not tile"):
        picture_grid([a, b[:, :5, :5]])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) = \(2, 16, 16, 3\)"):
        picture_grid([a, b[:1]])
    with pytest.raises(ValueError, match="at least one column"):
        picture_grid([])


@pytest.mark.parametrize("squeeze", [False, True])
def test_masked_input_paints_holes_white(squeeze):
    (images,) = _random_columns(2, 8, 10, 1)
    masks = np.zeros((2, 8, 10, 1), np.uint8)
    masks[0, 2:5, 3:7] = 1
    masks[1, 6:, :4] = 1
    expected = images * (1 - masks) + 255 * masks  # the training job's formula, {0, 1} masks
    out = masked_input(images, masks[..., 0] if squeeze else masks)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.array_equal(out, expected.astype(np.uint8))
    assert np.array_equal(masked_input(images, 255 * masks), out)  # nonzero = hole
    for i in range(2):  # the evaluation job's per-image version
        single = images[i].copy()
        single[masks[i, ..., 0] > 0] = 255
        assert np.array_equal(out[i], single)
    assert not np.shares_memory(out, images)
    with pytest.raises(ValueError, match="masks must be"):
        masked_input(images, masks[:, :4])


def test_upsample_nearest_integer_factors_repeat_pixels():
    (pictures,) = _random_columns(2, 3, 4, 1)
    out = upsample_nearest(pictures, 12, 8)
    assert out.shape == (2, 12, 8, 3) and out.dtype == np.uint8
    assert np.array_equal(out, pictures.repeat(4, axis=1).repeat(2, axis=2))
    assert np.array_equal(upsample_nearest(pictures, 3, 4), pictures)
    assert np.array_equal(upsample_nearest(torch.from_numpy(pictures), 6, 4), pictures.repeat(2, axis=1))


def test_upsample_nearest_other_factors_take_the_floor_index():
    (pictures,) = _random_columns(1, 3, 4, 1)
    out = upsample_nearest(pictures, 7, 6)
    assert out.shape == (1, 7, 6, 3)
    rows = [i * 3 // 7 for i in range(7)]  # [0, 0, 0, 1, 1, 2, 2]
    cols = [j * 4 // 6 for j in range(6)]  # [0, 0, 1, 2, 2, 3]
    assert rows == [0, 0, 0, 1, 1, 2, 2] and cols == [0, 0, 1, 2, 2, 3]
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            assert np.array_equal(out[0, i, j], pictures[0, r, c])
    with pytest.raises(ValueError, match="uint8"):
        upsample_nearest(pictures.astype(np.int32), 6, 8)
    with pytest.raises(ValueError, match="positive"):
        upsample_nearest(pictures, 0, 8)
