"""Pictures for people: attention offsets as colours, masked inputs, nearest upsampling, picture grids.

Numpy only. Every picture is uint8 RGB, channels last: (N, H, W, 3). Masks: nonzero (> 0) = hole.
"""

from __future__ import annotations

import numpy as np


def _numpy(x) -> np.ndarray:
    """A tensor (anything with ``.detach()``) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _pictures(x, what: str) -> np.ndarray:
    """x as a numpy array, checked to be uint8 (N, H, W, 3); ValueError naming `what` otherwise."""
    x = _numpy(x)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    return x


def _make_color_wheel() -> np.ndarray:
    """Middlebury colour wheel (Baker et al. 2007): (55, 3) RGB in [0, 255]."""
    RY, YG, GC, CB, BM, MR = 15, 6, 4, 11, 13, 6
    wheel = []
    wheel += [[255, 255 * i / RY, 0] for i in range(RY)]
    wheel += [[255 - 255 * i / YG, 255, 0] for i in range(YG)]
    wheel += [[0, 255, 255 * i / GC] for i in range(GC)]
    wheel += [[0, 255 - 255 * i / CB, 255] for i in range(CB)]
    wheel += [[255 * i / BM, 0, 255] for i in range(BM)]
    wheel += [[255, 0, 255 - 255 * i / MR] for i in range(MR)]
    return np.asarray(wheel, dtype=np.float64)


def flow_to_image(offsets) -> np.ndarray:
    """Render attention offsets with the Middlebury colour wheel.

    offsets: (B,2,H,W) tensor or array, channel 0 = dy, channel 1 = dx (as returned by ContextualAttention).
    Returns uint8 (B,H,W,3) RGB: hue = direction, saturation = length normalised by each sample's largest
    length (zero offset = white).
    """
    flow = np.asarray(_numpy(offsets), dtype=np.float64)
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"offsets must be (B,2,H,W), got {flow.shape}")
    dy, dx = flow[:, 0], flow[:, 1]  # (B, H, W)
    rad = np.sqrt(dx**2 + dy**2)
    maxrad = np.maximum(rad.reshape(rad.shape[0], -1).max(1), 1e-8)[:, None, None]  # (B, 1, 1)
    u, v = dx / maxrad, dy / maxrad
    wheel = _make_color_wheel()
    ncols = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # [-1, 1]
    fk = (angle + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % ncols
    frac = (fk - k0)[..., None]
    col = ((1 - frac) * wheel[k0] + frac * wheel[k1]) / 255.0  # (B, H, W, 3)
    radius = np.minimum(rad / maxrad, 1.0)[..., None]
    col = 1 - radius * (1 - col)  # saturation grows with length
    return np.clip(np.floor(255 * col + 0.5), 0, 255).astype(np.uint8)


def masked_input(images, masks) -> np.ndarray:
    """The images as the model sees them: hole pixels painted white.

    images: uint8 (N,H,W,3). masks: (N,H,W,1) or (N,H,W), nonzero (> 0) = hole ({0,1} or {0,255}).
    Returns a new uint8 (N,H,W,3): 255 in every channel at hole pixels, the image elsewhere.
    """
    images, masks = _pictures(images, "images"), _numpy(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]  # (N, H, W)
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be (N, H, W, 1) or (N, H, W) matching images {images.shape}, "
                         f"got {masks.shape}")
    out = images.copy()
    out[masks > 0] = 255
    return out


def upsample_nearest(pictures, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of uint8 (N,h,w,3) pictures to uint8 (N,height,width,3).

    Output pixel (i, j) is input pixel (floor(i * h / height), floor(j * w / width)): pixel repetition when
    height and width are integer multiples of h and w (what OpenCV's INTER_NEAREST gives for such factors).
    """
    pictures = _pictures(pictures, "pictures")
    h, w = pictures.shape[1:3]
    if min(height, width, h, w) < 1:
        raise ValueError(f"cannot resize {h}x{w} pictures to {height}x{width}: sizes must be positive")
    rows = np.arange(height) * h // height  # (height,) exact integer floor
    cols = np.arange(width) * w // width  # (width,)
    return pictures[:, rows][:, :, cols]  # (N, height, width, 3)


def picture_grid(columns, *, gap: int = 2, border: int = 0) -> np.ndarray:
    """One row per sample, one column per array of ``columns``, white (255) between and around the tiles.

    columns: list of uint8 (N,H,W,3) arrays, the same N; (H, W) is the largest tile size among them. A
    column with smaller tiles that tile (H, W) exactly (e.g. attention pictures on the offsets' coarser
    grid) is scaled up by pixel repetition (``upsample_nearest``). gap: pixels between neighbouring tiles;
    border: pixels around the whole grid.
    Returns uint8 (N*H + (N-1)*gap + 2*border, K*W + (K-1)*gap + 2*border, 3) for K columns.
    Raises ValueError for a column that is not uint8 (N,H,W,3) or does not tile (H, W).
    """
    columns = [_pictures(c, "grid columns") for c in columns]
    if not columns:
        raise ValueError("picture_grid needs at least one column")
    n = columns[0].shape[0]
    h, w = max(c.shape[1] for c in columns), max(c.shape[2] for c in columns)
    tiles = []
    for c in columns:
        if c.shape[1:3] != (h, w):
            if 0 in c.shape[1:3] or h % c.shape[1] or w % c.shape[2]:
                raise ValueError(f"grid column {c.shape} does not tile the images {(n, h, w, 3)}")
            c = upsample_nearest(c, h, w)  # (N, H, W, 3)
        if c.shape[0] != n:
            raise ValueError(f"grid columns must be uint8 (N, H, W, 3) = {(n, h, w, 3)}, "
                             f"got {c.dtype} {c.shape}")
        tiles.append(c)
    k = len(tiles)
    grid = np.full((n * h + (n - 1) * gap + 2 * border, k * w + (k - 1) * gap + 2 * border, 3), 255, np.uint8)
    for i in range(n):
        for j, c in enumerate(tiles):
            y, x = border + i * (h + gap), border + j * (w + gap)
            grid[y:y + h, x:x + w] = c[i]
    return grid
