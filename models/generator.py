"""DeepFill v1 generator: a coarse network and a refinement network with contextual attention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import ContextualAttention
from models.layers import GenConv, GenDeconv, check_semantics, resize_nearest_tf, set_semantics

ATTENTIONS = ("contextual", "none")


def check_attention(attention: str) -> str:
    """attention if it is one of ATTENTIONS, else ValueError."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}: expected one of {', '.join(ATTENTIONS)}")
    return attention


class InpaintGenerator(nn.Module):
    """Two-stage coarse-to-fine inpainting generator (layer list in the DeepFill v1 release).

    With cnum=32 it has exactly 3,601,542 parameters. `self.attention` is the ContextualAttention module
    (None in the baseline, below).

    attention: "contextual" (default: DeepFill v1) or "none", the paper's baseline (its section 3, the
    arm of its ablation study): the same coarse-to-fine network without the contextual-attention branch.
    Its refinement network is the dilated-convolution branch alone, so the decoder's first convolution takes
    4c channels instead of the concatenated 8c. Layers of the baseline (c = cnum):
      stage 1 (``coarse``): as the full model;
      ``refine_conv``: 5x5 ->c | 3x3 s2 ->c | 3x3 ->2c | 3x3 s2 ->2c | 3x3 ->4c | 3x3 ->4c | d2, d4, d8, d16 ->4c;
      ``refine_dec``: 3x3 ->4c (from 4c) | 3x3 ->4c | up + 3x3 ->2c | 3x3 ->2c | up + 3x3 ->c | 3x3 ->c/2 |
      3x3 ->3 | clamp.
    With cnum=32 the baseline has 2,758,118 parameters (the full model less the attention branch's 695,968 and
    the 147,456 weights of the decoder's first convolution that read it). ``self.attention``,
    ``refine_attn_in`` and ``refine_attn_out`` are None (``models.inpaint`` then has no attention memory
    budget to set), and forward returns offsets of zeros (B,2,H/8,W/8) int64, so every caller of the offsets
    keeps working and the attention pictures (``flow_to_image``) are white. ``self.attention_kind`` holds the
    setting; the checkpoint records it (``models.checkpoint``).

    semantics: "torch" (default: every model trained here) or "tf", the arithmetic of the authors' TensorFlow
    release, for its converted weights (``models.weights_tf``): TF 'SAME' padding on the stride-2 convolutions,
    and align_corners nearest resizes for the mask at 1/4 and the attention's down-sampling
    (``models.layers``). The parameters are the same; the checkpoint records the setting
    (``models.checkpoint``). ``models.layers.set_semantics(generator, s)`` switches a built generator.
    """

    def __init__(self, cnum: int = 32, semantics: str = "torch", attention: str = "contextual"):
        super().__init__()
        self.cnum = c = int(cnum)
        self.attention_kind = check_attention(attention)
        # Stage 1: coarse network (5 input channels: masked image, ones, mask).
        self.coarse = nn.Sequential(
            GenConv(5, c, 5), GenConv(c, 2 * c, 3, 2), GenConv(2 * c, 2 * c, 3),
            GenConv(2 * c, 4 * c, 3, 2), GenConv(4 * c, 4 * c, 3), GenConv(4 * c, 4 * c, 3),
            GenConv(4 * c, 4 * c, 3, dilation=2), GenConv(4 * c, 4 * c, 3, dilation=4),
            GenConv(4 * c, 4 * c, 3, dilation=8), GenConv(4 * c, 4 * c, 3, dilation=16),
            GenConv(4 * c, 4 * c, 3), GenConv(4 * c, 4 * c, 3),
            GenDeconv(4 * c, 2 * c), GenConv(2 * c, 2 * c, 3),
            GenDeconv(2 * c, c), GenConv(c, c // 2, 3), GenConv(c // 2, 3, 3, activation="none"),
        )
        # Stage 2, dilated-convolution branch.
        self.refine_conv = nn.Sequential(
            GenConv(5, c, 5), GenConv(c, c, 3, 2), GenConv(c, 2 * c, 3),
            GenConv(2 * c, 2 * c, 3, 2), GenConv(2 * c, 4 * c, 3), GenConv(4 * c, 4 * c, 3),
            GenConv(4 * c, 4 * c, 3, dilation=2), GenConv(4 * c, 4 * c, 3, dilation=4),
            GenConv(4 * c, 4 * c, 3, dilation=8), GenConv(4 * c, 4 * c, 3, dilation=16),
        )
        if self.attention_kind == "contextual":
            # Stage 2, attention branch (ReLU before the attention, as in the TF release).
            self.refine_attn_in = nn.Sequential(
                GenConv(5, c, 5), GenConv(c, c, 3, 2), GenConv(c, 2 * c, 3),
                GenConv(2 * c, 4 * c, 3, 2), GenConv(4 * c, 4 * c, 3),
                GenConv(4 * c, 4 * c, 3, activation="relu"),
            )
            self.attention = ContextualAttention(ksize=3, stride=1, rate=2, fuse_k=3, softmax_scale=10.0,
                                                 fuse=True)
            self.refine_attn_out = nn.Sequential(GenConv(4 * c, 4 * c, 3), GenConv(4 * c, 4 * c, 3))
        else:  # the baseline: no attention branch
            self.refine_attn_in = self.attention = self.refine_attn_out = None
        # Stage 2 decoder on the concatenated branches (the dilated branch alone in the baseline).
        dec_in = 8 * c if self.attention is not None else 4 * c
        self.refine_dec = nn.Sequential(
            GenConv(dec_in, 4 * c, 3), GenConv(4 * c, 4 * c, 3),
            GenDeconv(4 * c, 2 * c), GenConv(2 * c, 2 * c, 3),
            GenDeconv(2 * c, c), GenConv(c, c // 2, 3), GenConv(c // 2, 3, 3, activation="none"),
        )
        self.semantics = check_semantics(semantics)
        set_semantics(self, semantics)

    # How far (in rows of the H/4 feature map) the layers after the attention carry a value: refine_attn_out
    # and refine_dec's two 3x3 convolutions at H/4 (4 rows), then 3x3 convolutions after each x2 upsampling
    # (2 at H/2, 3 at H: 1.75 rows), rounded up.
    ATTENTION_REACH = 6

    def forward(self, image: torch.Tensor, mask: torch.Tensor, *, holes_only: bool = False):
        """image (B,3,H,W) in [-1,1]; mask (B,1,H,W) float {0,1}, 1 = hole; H, W multiples of 8.

        Returns coarse (B,3,H,W) and refined (B,3,H,W), both in [-1,1] (hole and known pixels: the caller
        composites), and offsets (B,2,H/8,W/8) int64 from the attention (for flow_to_image; zeros for the
        baseline, attention "none").

        holes_only: the caller keeps only the hole pixels of ``refined`` (inference: ``models.inpaint``).
        The attention then skips the rows of its grid that cannot reach a hole pixel (farther than
        ATTENTION_REACH feature rows from every hole row of the batch): ``refined`` is unchanged in the holes,
        not elsewhere, and those rows' offsets are 0. The attention's cost scales with the rows it keeps.
        The baseline (attention "none") has no attention to skip: the flag changes nothing there.
        """
        B, _, H, W = image.shape
        if H % 8 or W % 8:
            raise ValueError(f"InpaintGenerator needs H and W multiples of 8, got {H}x{W} (use models.inpaint)")
        if mask.shape != (B, 1, H, W):
            raise ValueError(f"mask must be (B,1,H,W) = {(B, 1, H, W)}, got {tuple(mask.shape)}")
        mask = mask.to(image.dtype)
        ones = torch.ones_like(mask)
        known = image * (1 - mask)
        coarse = self.coarse(torch.cat([known, ones, mask], 1)).clamp(-1, 1)  # (B, 3, H, W)

        xnow = coarse * mask + known
        xin = torch.cat([xnow, ones, mask], 1)  # (B, 5, H, W)
        del xnow
        x_conv = self.refine_conv(xin)  # (B, 4c, H/4, W/4)
        if self.attention is None:  # the baseline: the dilated branch alone
            del xin
            refined = self.refine_dec(x_conv).clamp(-1, 1)  # (B, 3, H, W)
            offsets = torch.zeros(B, 2, H // 8, W // 8, dtype=torch.int64, device=image.device)
            return coarse, refined, offsets
        x_att = self.refine_attn_in(xin)  # (B, 4c, H/4, W/4)
        del xin
        # Hole mask at feature resolution: a cell is a hole if any of its 4x4 pixels is.
        mask_s = F.max_pool2d(mask, 4)  # (B, 1, H/4, W/4)
        rows = self._attention_rows(mask_s) if holes_only else None
        if self.semantics == "tf":  # the release's resize_mask_like: align_corners nearest to 1/4
            mask_s = resize_nearest_tf(mask, (H // 4, W // 4))  # (B, 1, H/4, W/4)
        x_att, offsets = self.attention(x_att, x_att, mask_s, rows=rows)
        x_att = self.refine_attn_out(x_att)
        refined = self.refine_dec(torch.cat([x_conv, x_att], 1)).clamp(-1, 1)  # (B, 3, H, W)
        return coarse, refined, offsets

    def _attention_rows(self, mask_s: torch.Tensor) -> tuple[int, int]:
        """(first, end) rows of the attention grid whose pasted patches come within ATTENTION_REACH feature
        rows of a hole row of any sample; mask_s (B,1,H/4,W/4). (0, 0) when there is no hole."""
        holes = torch.nonzero(mask_s.amax(dim=(0, 1, 3)) > 0.5).flatten()
        if holes.numel() == 0:
            return 0, 0
        first, end = int(holes[0]), int(holes[-1]) + 1  # hole rows [first, end) of the feature map
        r, reach = self.attention.rate, self.ATTENTION_REACH
        # grid row i pastes its 2r x 2r patch on feature rows [i*r - r//2, i*r - r//2 + 2r)
        lo = (first - reach + r // 2 - 2 * r) // r + 1
        hi = -(-(end + reach + r // 2) // r)
        h = mask_s.shape[-2] // r
        return max(0, lo), min(h, hi)
