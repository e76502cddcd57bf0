"""WGAN-GP critics (local on a crop around the hole, global on the whole image) and the crop helper."""

from __future__ import annotations

import torch
import torch.nn as nn

from models.layers import DisConv


class Critic(nn.Module):
    """WGAN-GP critic on a (B,3,size,size) image in [-1,1]: 4 DisConvs (c, 2c, 4c, last_mult*c, each halving
    the side) + linear -> (B,1) unbounded scores.

    The DeepFill v1 release has two: the local critic on a crop around the hole (``local_critic``,
    last_mult 8) and the global critic on the whole image (``global_critic``, last_mult 4).
    """

    def __init__(self, cnum: int = 64, size: int = 256, last_mult: int = 4):
        super().__init__()
        if size % 16:
            raise ValueError(f"critic size must be a multiple of 16, got {size}")
        c = cnum
        self.size = size
        self.features = nn.Sequential(DisConv(3, c), DisConv(c, 2 * c), DisConv(2 * c, 4 * c),
                                      DisConv(4 * c, last_mult * c))  # (B, last_mult*c, size/16, size/16)
        self.linear = nn.Linear(last_mult * c * (size // 16) ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,3,size,size) in [-1,1] -> (B,1) unbounded scores."""
        return self.linear(self.features(x).flatten(1))


def local_critic(cnum: int = 64, size: int = 128) -> Critic:
    """The local critic, on a (B,3,size,size) crop around the hole (DisConvs c, 2c, 4c, 8c).

    cnum=64, size=128: 4,339,329 parameters.
    """
    return Critic(cnum, size, last_mult=8)


def global_critic(cnum: int = 64, size: int = 256) -> Critic:
    """The global critic, on the whole (B,3,size,size) image (DisConvs c, 2c, 4c, 4c).

    cnum=64, size=256: 2,733,441 parameters.
    """
    return Critic(cnum, size, last_mult=4)


def hole_crop_corners(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Top-left corners (B,2) int64 of size x size windows centred on each sample's hole bounding box,
    clamped inside the image. mask (B,1,H,W), 1 = hole; a sample without holes is centred on the image."""
    B, _, H, W = mask.shape
    if size > H or size > W:
        raise ValueError(f"crop size {size} larger than the image {H}x{W}")
    hole = mask[:, 0] > 0.5  # (B, H, W)
    corners = []
    for axis, n in ((2, H), (1, W)):  # rows: any over columns; columns: any over rows
        present = hole.any(axis)  # (B, n)
        idx = torch.arange(n, device=mask.device)
        lo = torch.where(present, idx, n).amin(1)  # (B,)
        hi = torch.where(present, idx, -1).amax(1)  # (B,)
        has = hi >= 0
        centre2 = torch.where(has, lo + hi + 1, torch.full_like(lo, n))  # twice the centre
        corners.append(((centre2 - size) // 2).clamp(0, n - size))
    return torch.stack(corners, 1)  # (B, 2)


def crop_around_holes(x: torch.Tensor, mask: torch.Tensor, size: int, corners: torch.Tensor | None = None):
    """Per-sample crops (B,C,size,size) of x (B,C,H,W) centred on each sample's hole bounding box
    (mask (B,1,H,W), 1 = hole), clamped inside the image. Differentiable w.r.t. x. Pass the same mask for
    images and masks so the crops line up (or pass `corners` from hole_crop_corners)."""
    B, C, H, W = x.shape
    if corners is None:
        corners = hole_crop_corners(mask, size)
    ar = torch.arange(size, device=x.device)
    rows = (corners[:, 0:1] + ar)[:, :, None]  # (B, size, 1)
    cols = (corners[:, 1:2] + ar)[:, None, :]  # (B, 1, size)
    bidx = torch.arange(B, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[bidx, rows, cols]  # (B, size, size, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, size, size)
