"""Building blocks shared by the generator and the critics.

All convolutions use zero 'same' padding (output size = ceil(input / stride)), no normalisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GenConv(nn.Module):
    """conv (+ bias) + activation, the generator's layer. x (B,Cin,H,W) -> (B,Cout,ceil(H/s),ceil(W/s)).

    activation: "elu" (default), "relu" or "none" (the output layer).
    """

    def __init__(self, cin: int, cout: int, ksize: int = 3, stride: int = 1, dilation: int = 1,
                 activation: str = "elu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride=stride, padding=dilation * (ksize - 1) // 2,
                              dilation=dilation)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class GenDeconv(nn.Module):
    """nearest x2 upsample, then a 3x3 GenConv. x (B,Cin,H,W) -> (B,Cout,2H,2W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = GenConv(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class DisConv(nn.Module):
    """5x5 conv, stride 2 (+ bias) + LeakyReLU(0.2), the critics' layer. (B,Cin,H,W) -> (B,Cout,H/2,W/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 5, stride=2, padding=2)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def make_activation(kind: str) -> nn.Module:
    """'elu' | 'relu' | 'none' -> module."""
    if kind == "elu":
        return nn.ELU()
    if kind == "relu":
        return nn.ReLU()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {kind!r}")
