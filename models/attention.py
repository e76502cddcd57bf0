"""Contextual attention (Yu et al. 2018, section 3.2), batched, chunked and cheap.

The module matches each foreground position of f against every 3x3 background patch of b (on a grid
downsampled by `rate`), softmaxes the scores over background patches, and pastes back the
full-resolution 2*rate x 2*rate background patches weighted by the attention.

How it is computed (equal to the reference definition, but organised for speed and memory):
- scores: the reference convolves f with the L2-normalised 3x3 patches of b (C*9 dims per dot product).
  We form the Gram matrix G of single feature vectors (C dims) between zero-padded f and b once, and
  sum its 9 shifted diagonals: score[(i,j),(p,q)] = sum_uv G[(i+u,j+v),(p+u,q+v)] / |patch(p,q)|.
  Same numbers, 9x fewer multiply-adds.
- propagation (fuse): the reference convolves the (L_fg x L_bg) score map with a fuse_k x fuse_k identity
  kernel, once in row-major and once in column-major flattening. That convolution is a sum of fuse_k
  shifted diagonals; we add the shifted slices directly.
- paste-back: the reference is a transposed convolution of the attention with 4x4 raw patches at
  stride 2. A 4x4 patch at stride 2 is 2x2 "phase" pixels of the background and of its neighbour, so the
  transposed convolution equals one matrix product of (attention summed over 4 shifted diagonals) with the
  rate*rate phase images of b: 4x fewer multiply-adds. We divide by the exact number of overlapping patches.
- batching: every product is a batched matmul over the batch (the same computation as a grouped
  convolution with groups = B); per-sample masks; no Python loop over samples.
- chunking: when the (B, L_fg, L_bg) score volume would exceed `max_score_bytes`, foreground rows are
  processed in chunks. The propagation step couples neighbouring foreground positions (and, through the
  flattened orders, the first and last rows), so each chunk computes the scores of the rows it depends on
  (a halo, cached between chunks); results equal the unchunked ones up to float summation order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_MAX_SCORE_BYTES = 256 * 2**20


class ContextualAttention(nn.Module):
    """Contextual attention with per-sample masks.

    Args:
        ksize: matching patch size on the downsampled grid (3).
        stride: background patch stride on the downsampled grid; only 1 (what every DeepFill model uses)
            is implemented.
        rate: downsampling factor for matching; the pasted patches are 2*rate x 2*rate at full resolution.
        fuse_k: size of the identity kernel of the attention propagation (odd).
        softmax_scale: multiplies the cosine-like scores before the softmax.
        fuse: whether to apply the attention propagation.
        max_score_bytes: memory budget for one float32 (B, rows*W/rate, L_bg) score block; foreground rows
            are chunked to stay near it. Attribute; may be changed at any time.

    Invalid background patches (any hole pixel under the 3x3 matching patch on the downsampled mask, where
    a downsampled cell is a hole if any of its rate x rate pixels is) get exactly zero attention: their
    logits are -inf. A sample without any valid background patch gets zero attention everywhere: its output
    y is 0 and its offsets are 0 (finite, documented fallback).
    """

    def __init__(self, ksize: int = 3, stride: int = 1, rate: int = 2, fuse_k: int = 3,
                 softmax_scale: float = 10.0, fuse: bool = True,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES):
        super().__init__()
        if ksize < 1 or ksize % 2 == 0:
            raise ValueError(f"ksize must be odd and positive, got {ksize}")
        if stride != 1:
            raise ValueError(f"only stride=1 is supported, got {stride}")
        if rate < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        if fuse_k < 1 or fuse_k % 2 == 0:
            raise ValueError(f"fuse_k must be odd and positive, got {fuse_k}")
        self.ksize, self.stride, self.rate, self.fuse_k = ksize, stride, rate, fuse_k
        self.softmax_scale, self.fuse = float(softmax_scale), bool(fuse)
        self.max_score_bytes = int(max_score_bytes)

    def extra_repr(self) -> str:
        return (f"ksize={self.ksize}, stride={self.stride}, rate={self.rate}, fuse_k={self.fuse_k}, "
                f"softmax_scale={self.softmax_scale}, fuse={self.fuse}, max_score_bytes={self.max_score_bytes}")

    def forward(self, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                rows: tuple[int, int] | None = None):
        """f: foreground features (B,C,H,W); b: background features (B,C,Hb,Wb); mask: (B,1,Hb,Wb), 1 = hole
        in b. H, W, Hb, Wb must be multiples of rate.

        Returns y (B,C,H,W) (f's shape, b's dtype) and offsets (B,2,H//rate,W//rate) int64: the (dy, dx) from
        each foreground position to its best-matching background position on the downsampled grid.

        rows: (first, end) foreground rows of the downsampled grid to attend from (default: all). The other
        rows are skipped: their offsets are 0 and y holds only the pasted patches of the attended rows (0
        beyond them). Inference uses it to skip rows that cannot reach a hole pixel (``InpaintGenerator``).
        """
        y, offsets, _ = self._run(f, b, mask, keep_attention=False, rows=rows)
        return y, offsets

    def attention(self, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, L_fg, L_bg), rows = foreground positions, columns = background positions
        (both row-major on the downsampled grids). Each row sums to 1 (0 for a sample without valid
        background). For tests and visualisation; allocates the full volume."""
        return self._run(f, b, mask, keep_attention=True)[2]

    # ---------------------------------------------------------------------------------------------------
    def _run(self, f, b, mask, keep_attention, rows=None):
        B, C, H, W = f.shape
        Hb, Wb = b.shape[-2:]
        r, k = self.rate, self.ksize
        if b.shape[:2] != (B, C):
            raise ValueError(f"f and b must agree in batch and channels, got {tuple(f.shape)} and {tuple(b.shape)}")
        if mask.shape != (B, 1, Hb, Wb):
            raise ValueError(f"mask must be (B,1,Hb,Wb) = {(B, 1, Hb, Wb)}, got {tuple(mask.shape)}")
        if H % r or W % r or Hb % r or Wb % r:
            raise ValueError(f"feature sizes must be multiples of rate={r}, got {H}x{W} and {Hb}x{Wb}")
        h, w, hb, wb = H // r, W // r, Hb // r, Wb // r
        L, Lb = h * w, hb * wb
        row_lo, row_hi = (0, h) if rows is None else (max(0, int(rows[0])), min(h, int(rows[1])))
        p = k // 2
        dev = f.device
        score_dtype = torch.promote_types(f.dtype, torch.float32)

        # Matching grid: nearest downsampling (pixel (i*r, j*r)), zero 'same' padding for the k x k patches.
        fp = F.pad(f[:, :, ::r, ::r], (p, p, p, p))  # (B, C, h+2p, w+2p)
        bd = b[:, :, ::r, ::r]  # (B, C, hb, wb)
        bp_flat = F.pad(bd, (p, p, p, p)).flatten(2)  # (B, C, (hb+2p)*(wb+2p))
        # L2 norm of each background k x k patch (zero padding), clamped like the reference.
        sq = bd.to(score_dtype).square().sum(1, keepdim=True)  # (B, 1, hb, wb)
        norm2 = F.avg_pool2d(sq, k, stride=1, padding=p, count_include_pad=True) * (k * k)
        inv_norm = norm2.clamp_min(0).sqrt().clamp_min(1e-4).reciprocal().view(B, 1, Lb)  # (B, 1, Lb)
        # Valid background patches: no hole anywhere under the patch (a cell is a hole if any pixel is).
        md = F.max_pool2d(mask.to(score_dtype), r)  # (B, 1, hb, wb)
        valid = (F.max_pool2d(md, k, stride=1, padding=p) < 0.5).view(B, Lb)  # (B, Lb)
        any_valid = valid.any(1)  # (B,)
        invalid = (~(valid | ~any_valid[:, None])).view(B, 1, Lb)  # (B, 1, Lb); all-invalid rows unmasked
        keep = any_valid.to(score_dtype).view(B, 1, 1)  # zero attention for samples without valid background

        # Paste-back phase images of b: P[(t,s), (a,c,ch)] = b_pad[ch, t*r + a, s*r + c].
        bpad = F.pad(b, (r // 2, r - r // 2, r // 2, r - r // 2))  # (B, C, (hb+1)r, (wb+1)r)
        P = bpad.view(B, C, hb + 1, r, wb + 1, r).permute(0, 2, 4, 3, 5, 1)  # (B, hb+1, wb+1, r, r, C)
        P = P.reshape(B, (hb + 1) * (wb + 1), r * r * C)  # (B, Lb', r*r*C)

        rows_per_chunk = max(1, self.max_score_bytes // max(1, B * w * Lb * 4))
        rows_per_chunk = min(rows_per_chunk, max(1, row_hi - row_lo))
        runs: list[tuple[int, int, torch.Tensor]] = []  # (first row, end row, scores (B, rows*w, Lb)) cached

        def score_rows(a: int, c: int) -> torch.Tensor:
            """Unfused scores of foreground rows [a, c): (B, (c-a)*w, Lb), score_dtype."""
            n = c - a
            G = torch.bmm(fp[:, :, a:c + 2 * p].flatten(2).transpose(1, 2), bp_flat)  # (B, (n+2p)(w+2p), Lb')
            G = G.to(score_dtype).view(B, n + 2 * p, w + 2 * p, hb + 2 * p, wb + 2 * p)
            pairs = [(..., (slice(None), slice(u, u + n), slice(v, v + w), slice(u, u + hb), slice(v, v + wb)))
                     for u in range(k) for v in range(k)]
            S = _ShiftAdd.apply(G, (B, n, w, hb, wb), pairs)  # sum of the k*k shifted diagonals
            del G
            return (S.reshape(B, n * w, Lb) * inv_norm)  # (B, n*w, Lb)

        def find_run(t: int):
            for run in runs:
                if run[0] <= t < run[1]:
                    return run
            return None

        def gather_rows(rows: list[int]) -> torch.Tensor:
            """Unfused scores of the given sorted rows, computing missing ones: (B, len(rows)*w, Lb)."""
            missing = [t for t in rows if find_run(t) is None]
            i = 0
            while i < len(missing):  # compute contiguous runs of missing rows
                j = i
                while j + 1 < len(missing) and missing[j + 1] == missing[j] + 1:
                    j += 1
                runs.append((missing[i], missing[j] + 1, score_rows(missing[i], missing[j] + 1)))
                i = j + 1
            pieces, i = [], 0
            while i < len(rows):
                a, c, S = find_run(rows[i])
                j = i
                while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1 and rows[j + 1] < c:
                    j += 1
                lo, hi = rows[i] - a, rows[j] + 1 - a
                pieces.append(S if (lo, hi) == (0, c - a) else S[:, lo * w:hi * w])
                i = j + 1
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)

        offsets = torch.zeros(B, 2, L, dtype=torch.int64, device=dev)
        pieces = []  # paste-back outputs, one per chunk, in row order
        attn_all = [] if keep_attention else None
        prev_row = None  # last attention row of the previous chunk (B, w, Lb), for the paste-back overlap
        fk = self.fuse_k // 2
        for r0 in range(row_lo, row_hi, rows_per_chunk):
            r1 = min(row_hi, r0 + rows_per_chunk)
            targets = torch.arange(r0 * w, r1 * w, device=dev)  # global row-major fg indices of this chunk
            if self.fuse:
                # Rows whose scores this chunk depends on (column-major, then row-major neighbours).
                mid = _unique(torch.cat([_cm_shift(targets, d, h, w)[0] for d in range(-fk, fk + 1)]))
                need = _unique(torch.cat([_rm_shift(mid, d, L)[0] for d in range(-fk, fk + 1)]))
                rows = sorted(set((need // w).tolist()))
            else:
                rows = list(range(r0, r1))
            X = gather_rows(rows)  # (B, n_src*w, Lb)
            src_rows = torch.tensor(rows, device=dev)
            if self.fuse:
                pos = torch.full((L,), -1, dtype=torch.int64, device=dev)
                pos.view(h, w)[src_rows] = torch.arange(len(rows) * w, device=dev).view(len(rows), w)
                X1 = _diag_pass(X, pos, mid, lambda t, d: _rm_shift(t, d, L), fk, Lb)  # (B, m, Lb)
                del X
                X1 = X1.view(B, -1, hb, wb).transpose(2, 3).reshape(B, -1, Lb)  # background in column-major
                pos = torch.full((L,), -1, dtype=torch.int64, device=dev)
                pos[mid] = torch.arange(mid.numel(), device=dev)
                X2 = _diag_pass(X1, pos, targets, lambda t, d: _cm_shift(t, d, h, w), fk, Lb)  # (B, n, Lb)
                del X1
                scores = X2.view(B, -1, wb, hb).transpose(2, 3).reshape(B, -1, Lb)  # back to row-major
                del X2
            else:
                scores = X
            logits = (scores * self.softmax_scale).masked_fill(invalid, float("-inf"))  # (B, n, Lb)
            del scores
            best = logits.argmax(-1)  # (B, n)
            attn = torch.softmax(logits, dim=-1) * keep  # (B, n, Lb)
            del logits
            fy, fx = targets // w, targets % w
            offsets[:, 0, r0 * w:r1 * w] = (best // wb - fy) * any_valid[:, None]
            offsets[:, 1, r0 * w:r1 * w] = (best % wb - fx) * any_valid[:, None]
            if keep_attention:
                attn_all.append(attn)

            # Paste-back of output rows I in [r0, r1) (+ row I = r1 on the band's last chunk, which only the
            # band's last row reaches; I = h is the padded row):
            # A[I] = sum_{di,dj in {0,1}} attn[I-di, J-dj] shifted by (di, dj) in the background.
            nr = r1 - r0
            first = prev_row if prev_row is not None else attn.new_zeros(B, w, Lb)
            ext = [first.unsqueeze(1), attn.view(B, nr, w, Lb)]
            if r1 == row_hi:
                ext.append(attn.new_zeros(B, 1, w, Lb))
            ext = torch.cat(ext, 1).view(B, -1, w, hb, wb)  # (B, ne, w, hb, wb), rows r0-1 ...
            prev_row = attn.view(B, nr, w, Lb)[:, -1]
            del attn
            no = ext.shape[1] - 1  # output rows of this chunk
            pairs = [((slice(None), slice(None), slice(dj, dj + w), slice(di, di + hb), slice(dj, dj + wb)),
                      (slice(None), slice(1 - di, 1 - di + no))) for di in (0, 1) for dj in (0, 1)]
            A = _ShiftAdd.apply(ext, (B, no, w + 1, hb + 1, wb + 1), pairs)  # (B, no, w+1, hb+1, wb+1)
            del ext
            out = torch.bmm(A.view(B, no * (w + 1), (hb + 1) * (wb + 1)).to(P.dtype), P)  # (B, no*(w+1), r*r*C)
            del A
            out = out.view(B, no, w + 1, r, r, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, no, r, w+1, r)
            pieces.append(out.reshape(B, C, no * r, (w + 1) * r))
            # forget runs no later chunk needs (a run holding rows 0..fk stays: the last chunk's
            # column-major wrap-around needs them)
            runs[:] = [run for run in runs if run[0] <= fk or run[1] > r1 - 2 * fk - 2]

        if not pieces:  # an empty band: nothing attended
            y = b.new_zeros(B, C, (h + 1) * r, (w + 1) * r)
        else:
            y = torch.cat(pieces, 2) if len(pieces) > 1 else pieces[0]  # (B, C, (row_hi-row_lo+1)r, (w+1)r)
            if (row_lo, row_hi) != (0, h):
                y = F.pad(y, (0, 0, row_lo * r, (h - row_hi) * r))  # rows outside the band: nothing pasted
        y = y[:, :, r // 2:r // 2 + H, r // 2:r // 2 + W]
        y = y / _overlap_count(h, w, r, y.dtype, dev)
        attention = torch.cat(attn_all, 1) if keep_attention else None
        return y, offsets.view(B, 2, h, w), attention


def _overlap_count(h: int, w: int, r: int, dtype, device) -> torch.Tensor:
    """Number of pasted 2r x 2r patches covering each output pixel: (1, 1, h*r, w*r)."""

    def line(n):
        c = torch.full((n + 1,), 2.0, dtype=dtype, device=device)
        c[0] = c[-1] = 1.0
        return c.repeat_interleave(r)[r // 2:r // 2 + n * r]

    return (line(h)[:, None] * line(w)[None, :]).view(1, 1, h * r, w * r)


def _unique(t: torch.Tensor) -> torch.Tensor:
    return torch.unique(t, sorted=True)


def _rm_shift(a: torch.Tensor, d: int, L: int):
    """Row-major flat index a + d: (index clamped into range, valid mask)."""
    s = a + d
    ok = (s >= 0) & (s < L)
    return s.clamp(0, L - 1), ok


def _cm_shift(a: torch.Tensor, d: int, h: int, w: int):
    """Shift row-major index a by d in column-major flat order: (row-major index, valid mask)."""
    c = (a % w) * h + a // w + d
    ok = (c >= 0) & (c < h * w)
    c = c.clamp(0, h * w - 1)
    return (c % h) * w + c // h, ok


def _diag_pass(X, pos, targets, shift, fk, Lb):
    """One propagation pass: out[t, j] = sum_d X[shift(t, d), j + d] (zero outside the ranges).

    X: (B, n_src, Lb) rows indexed through pos (global index -> row of X); targets: global indices (n,).
    Returns (B, n, Lb)."""
    terms = []
    for d in range(-fk, fk + 1):
        src, ok = shift(targets, d)
        idx = pos[src]
        terms.append((d, idx, None if bool(ok.all()) else ok, _row_runs(idx, ok)))
    return _DiagPass.apply(X, terms, Lb)


_MAX_RUNS = 64  # above this many runs a term gathers its rows with one index_select instead


def _row_runs(idx: torch.Tensor, ok: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """Split a gather of rows idx (only where ok) into runs of consecutive rows: [(t0, t1, s0)] meaning
    rows t0..t1-1 of the output read rows s0..s0+t1-t0-1 of the source. None when there are more than
    _MAX_RUNS runs. Unchunked, a pass has 1-3 runs per shift; reading them as slices saves a copy."""
    idx, ok = idx.cpu(), ok.cpu()
    n = idx.numel()
    brk = torch.ones(n, dtype=torch.bool)
    brk[1:] = (idx[1:] != idx[:-1] + 1) | (ok[1:] != ok[:-1])
    starts = brk.nonzero().flatten().tolist()
    if len(starts) > 2 * _MAX_RUNS:
        return None
    runs = [(a, b, int(idx[a])) for a, b in zip(starts, starts[1:] + [n]) if bool(ok[a])]
    return runs if len(runs) <= _MAX_RUNS else None


def _lanes(d: int, Lb: int) -> tuple[slice, slice]:
    """(out columns, x columns) for out[:, :, j] += x[:, :, j + d], j + d within [0, Lb)."""
    return (slice(0, Lb - d), slice(d, Lb)) if d >= 0 else (slice(-d, Lb), slice(0, Lb + d))


class _ShiftAdd(torch.autograd.Function):
    """out = zeros(out_shape); out[dst] += x[src] for each (dst, src) index pair (dst may be ... = all).
    The backward is the adjoint, gx[src] += g[dst], into one buffer (autograd's slice backward would
    allocate and zero-fill a full-size gradient per slice)."""

    @staticmethod
    def forward(ctx, x, out_shape, pairs):
        ctx.x_shape, ctx.pairs = x.shape, pairs
        out = None
        for dst, src in pairs:
            if out is None and dst is Ellipsis:
                out = x[src].clone()
                continue
            if out is None:
                out = x.new_zeros(out_shape)
            out[dst] += x[src]
        return out

    @staticmethod
    def backward(ctx, g):
        gx = g.new_zeros(ctx.x_shape)
        for dst, src in ctx.pairs:
            gx[src] += g[dst]
        return gx, None, None


class _DiagPass(torch.autograd.Function):
    """out[:, t, j] = sum over terms (d, idx, ok, runs) of ok[t] * x[:, idx[t], j + d] (0 where j + d is out
    of range; ok None = all valid). x: (B, n_src, Lb) -> out (B, n, Lb). A term with runs (see _row_runs)
    adds slices of x in place; one without gathers its rows first."""

    @staticmethod
    def forward(ctx, x, terms, Lb):
        ctx.x_shape, ctx.terms, ctx.Lb = x.shape, terms, Lb
        n = terms[0][1].numel()
        out = None
        for d, idx, ok, runs in sorted(terms, key=lambda term: abs(term[0])):  # d = 0 first
            if out is None:
                if d == 0 and runs is not None and len(runs) == 1 and runs[0][:2] == (0, n):
                    out = x[:, runs[0][2]:runs[0][2] + n].clone()  # the unshifted term initialises out
                    continue
                out = x.new_zeros(x.shape[0], n, Lb)
            oc, xc = _lanes(d, Lb)
            if runs is None:
                g = x.index_select(1, idx)  # (B, n, Lb)
                if ok is not None:
                    g.mul_(ok.to(g.dtype)[None, :, None])
                out[:, :, oc] += g[:, :, xc]
                continue
            for t0, t1, s0 in runs:
                out[:, t0:t1, oc] += x[:, s0:s0 + t1 - t0, xc]
        return out

    @staticmethod
    def backward(ctx, g):
        Lb = ctx.Lb
        gx = g.new_zeros(ctx.x_shape)
        for d, idx, ok, runs in ctx.terms:
            oc, xc = _lanes(d, Lb)
            if runs is None:
                gs = g.new_zeros(g.shape)  # gs[:, :, j + d] = g[:, :, j]
                gs[:, :, xc] = g[:, :, oc]
                if ok is not None:
                    gs.mul_(ok.to(gs.dtype)[None, :, None])
                gx.index_add_(1, idx, gs)
                continue
            for t0, t1, s0 in runs:
                gx[:, s0:s0 + t1 - t0, xc] += g[:, t0:t1, oc]
        return gx, None, None


# ---------------------------------------------------------------------------------------------------------
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
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    flow = np.asarray(offsets, dtype=np.float64)
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
