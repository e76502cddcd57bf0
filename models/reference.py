"""Contextual attention by its definition, as the reference implementations compute it. For tests and
benchmarks only: a Python loop over samples, the full (L_fg x L_bg) score map per sample, slow.

``models.attention.ContextualAttention`` computes the same numbers (up to float summation order) batched,
chunked and with fewer multiply-adds; the tests compare the two in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, ksize: int = 3, rate: int = 2,
                        fuse_k: int = 3, softmax_scale: float = 10.0, fuse: bool = True):
    """The paper's contextual attention (Yu et al. 2018, section 3.2), one sample at a time.

    f: foreground features (B,C,H,W); b: background features (B,C,Hb,Wb); mask (B,1,Hb,Wb), 1 = hole in b;
    H, W, Hb, Wb multiples of rate. Per sample: match f (nearest-downsampled by rate) against the
    L2-normalised ksize x ksize patches of the downsampled b by convolution; propagate the (L_fg x L_bg)
    score map with a fuse_k x fuse_k identity kernel in row-major, then column-major flattening (if fuse);
    softmax over the valid background patches (no hole pixel under the patch; -inf logits elsewhere); paste
    the 2*rate x 2*rate raw patches of b back by a transposed convolution at stride rate, divided by the
    number of overlapping patches.

    Returns y (B,C,H,W) and offsets (B,2,H//rate,W//rate) int64, the (dy, dx) from each foreground position
    to its best-matching background position on the downsampled grid. A sample without any valid patch
    gives NaNs (softmax over all -inf); ContextualAttention defines that case as zero attention.
    """
    B, C, H, W = f.shape
    r, k, p = rate, ksize, ksize // 2
    h, w, hb, wb = H // r, W // r, b.shape[2] // r, b.shape[3] // r
    L, Lb = h * w, hb * wb
    ys, offs = [], []
    for i in range(B):
        fi, bi, mi = f[i:i + 1], b[i:i + 1], mask[i:i + 1]
        bpad = F.pad(bi, (r // 2, r - r // 2, r // 2, r - r // 2))  # (1, C, (hb+1)r, (wb+1)r)
        raw = F.unfold(bpad, 2 * r, stride=r).view(C, 2 * r, 2 * r, Lb).permute(3, 0, 1, 2)  # (Lb, C, 2r, 2r)
        fd, bd = fi[:, :, ::r, ::r], bi[:, :, ::r, ::r]  # (1, C, h, w), (1, C, hb, wb)
        wp = F.unfold(bd, k, padding=p).view(C, k, k, Lb).permute(3, 0, 1, 2)  # (Lb, C, k, k)
        wn = wp / wp.flatten(1).norm(dim=1).clamp_min(1e-4)[:, None, None, None]
        s = F.conv2d(fd, wn, padding=p).view(Lb, L).t()  # (L, Lb)
        if fuse:
            eye = torch.eye(fuse_k, dtype=f.dtype, device=f.device).view(1, 1, fuse_k, fuse_k)
            s = F.conv2d(s.view(1, 1, L, Lb), eye, padding=fuse_k // 2)  # row-major neighbours
            s = s.view(1, h, w, hb, wb).permute(0, 2, 1, 4, 3).reshape(1, 1, L, Lb)  # column-major order
            s = F.conv2d(s, eye, padding=fuse_k // 2)  # column-major neighbours
            s = s.view(1, w, h, wb, hb).permute(0, 2, 1, 4, 3).reshape(L, Lb)  # back to row-major
        md = F.max_pool2d(mi, r)  # (1, 1, hb, wb): a cell is a hole if any of its pixels is
        valid = (F.max_pool2d(md, k, stride=1, padding=p) < 0.5).view(Lb)
        logits = (s * softmax_scale).masked_fill(~valid, float("-inf"))  # (L, Lb)
        attn = torch.softmax(logits, dim=1)  # (L, Lb)
        best = logits.argmax(1)  # (L,)
        fy, fx = torch.arange(L, device=f.device) // w, torch.arange(L, device=f.device) % w
        offs.append(torch.stack([best // wb - fy, best % wb - fx]).view(1, 2, h, w))
        y = F.conv_transpose2d(attn.t().reshape(1, Lb, h, w), raw, stride=r)  # (1, C, (h+1)r, (w+1)r)
        ones = torch.ones(1, 1, h, w, dtype=f.dtype, device=f.device)
        cnt = F.conv_transpose2d(ones, torch.ones(1, 1, 2 * r, 2 * r, dtype=f.dtype, device=f.device), stride=r)
        y = (y / cnt)[:, :, r // 2:r // 2 + H, r // 2:r // 2 + W]  # (1, C, H, W)
        ys.append(y)
    return torch.cat(ys), torch.cat(offs)
