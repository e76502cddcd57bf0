"""Building blocks shared by the generator and the critics.

All convolutions use zero 'same' padding (output size = ceil(input / stride)), no normalisation.

Semantics (``SEMANTICS``): "torch" (the default; every model trained here) or "tf", the DeepFill v1 TensorFlow
release's arithmetic, for its converted weights (``models.weights_tf``):
- padding: TF's 'SAME' puts the odd pixel of padding at the bottom/right. A stride-2 3x3 convolution of an even
  input pads 0 rows on top and 1 at the bottom (PyTorch's padding=1: 1 and 1); the critics' stride-2 5x5: 1 and
  2. Stride-1 convolutions pad symmetrically in both (odd kernels), so only strided layers differ.
- resizes: the release's nearest-neighbour resizes use align_corners=True (``resize_nearest_tf``). For the x2
  upsampling of GenDeconv that picks exactly the rows of F.interpolate(mode="nearest") (source row
  round(i * (n-1) / (2n-1)) = i // 2), so GenDeconv has no switch; the down-samplings differ (the attention's
  by its rate, the generator's mask to 1/4: ``models.generator``, ``models.attention``).
``set_semantics`` switches a built model (generator or critic) in place; the parameters are the same.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


SEMANTICS = ("torch", "tf")


def check_semantics(semantics: str) -> str:
    """semantics if it is one of SEMANTICS, else ValueError."""
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}: expected one of {', '.join(SEMANTICS)}")
    return semantics


def set_semantics(module: nn.Module, semantics: str) -> nn.Module:
    """Set `semantics` ("torch" | "tf") on `module` and every submodule that has the setting (GenConv,
    DisConv, ContextualAttention, InpaintGenerator), in place. Returns module."""
    check_semantics(semantics)
    for m in module.modules():
        if hasattr(m, "semantics"):
            m.semantics = semantics
    return module


def tf_same_padding(size: int, ksize: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) zero padding of TF's 'SAME' along an axis of `size`: output ceil(size / stride), the odd
    pixel of padding after."""
    total = max((-(-size // stride) - 1) * stride + dilation * (ksize - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _conv_same(conv: nn.Conv2d, x: torch.Tensor, semantics: str) -> torch.Tensor:
    """conv(x) with 'same' padding as `semantics` has it (conv.padding is the torch one)."""
    if semantics == "torch" or conv.stride == (1, 1):
        return conv(x)
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    top, bottom = tf_same_padding(x.shape[-2], k, s, d)
    left, right = tf_same_padding(x.shape[-1], k, s, d)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation)


@functools.lru_cache(maxsize=256)
def _tf_nearest_index(n_in: int, n_out: int) -> tuple[int, ...]:
    """Source index of each output index of TF's resize_nearest_neighbor(align_corners=True) along one axis:
    min(roundf(i * scale), n_in - 1) with scale = (n_in - 1) / (n_out - 1) in float32 (n_in / n_out for
    n_out = 1), the product in float32, roundf rounding halves away from zero (TF's legacy nearest kernel)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(n_in) / np.float32(n_out)
    v = np.arange(n_out, dtype=np.float32) * np.float32(scale)  # float32 products, as in the kernel
    fl = np.floor(v)
    idx = fl + (v - fl >= np.float32(0.5))  # roundf for v >= 0
    return tuple(int(i) for i in np.minimum(idx, n_in - 1))


def resize_nearest_tf(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF's resize_nearest_neighbor(x, size, align_corners=True) (through neuralgym's ``resize``, as every
    resize of the DeepFill v1 release) on x (B,C,H,W) -> (B,C,size[0],size[1]), same dtype.
    Row i takes source row round(i * (H-1) / (size[0]-1)); for 64 -> 32: 0, 2, ..., 30, 33, 35, ..., 63."""
    H, W = x.shape[-2:]
    oh, ow = int(size[0]), int(size[1])
    rows = torch.tensor(_tf_nearest_index(H, oh), device=x.device)
    cols = torch.tensor(_tf_nearest_index(W, ow), device=x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


class GenConv(nn.Module):
    """conv (+ bias) + activation, the generator's layer. x (B,Cin,H,W) -> (B,Cout,ceil(H/s),ceil(W/s)).

    activation: "elu" (default), "relu" or "none" (the output layer). semantics: "torch" (default) or "tf"
    (TF 'SAME' padding on strided convolutions; see the module docstring).
    """

    def __init__(self, cin: int, cout: int, ksize: int = 3, stride: int = 1, dilation: int = 1,
                 activation: str = "elu", semantics: str = "torch"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride=stride, padding=dilation * (ksize - 1) // 2,
                              dilation=dilation)
        self.act = make_activation(activation)
        self.semantics = check_semantics(semantics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(_conv_same(self.conv, x, self.semantics))


class GenDeconv(nn.Module):
    """nearest x2 upsample, then a 3x3 GenConv. x (B,Cin,H,W) -> (B,Cout,2H,2W).

    The same under both semantics: TF's align_corners x2 nearest upsampling picks the same rows (module
    docstring; tests/test_weights_tf.py checks it against TF)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = GenConv(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class DisConv(nn.Module):
    """5x5 conv, stride 2 (+ bias) + LeakyReLU(0.2), the critics' layer. (B,Cin,H,W) -> (B,Cout,H/2,W/2).
    semantics "tf": TF 'SAME' padding (1 before, 2 after on even sizes; ``set_semantics`` on a built critic)."""

    def __init__(self, cin: int, cout: int, semantics: str = "torch"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 5, stride=2, padding=2)
        self.act = nn.LeakyReLU(0.2)
        self.semantics = check_semantics(semantics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(_conv_same(self.conv, x, self.semantics))


def make_activation(kind: str) -> nn.Module:
    """'elu' | 'relu' | 'none' -> module."""
    if kind == "elu":
        return nn.ELU()
    if kind == "relu":
        return nn.ReLU()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {kind!r}")
