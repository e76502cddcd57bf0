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

The code follows the same order: for each chunk of foreground rows, ``ContextualAttention._run`` takes the
scores (``_scores_for_rows``), propagates them (``_fuse``), applies the masked softmax (``_softmax``), writes
the offsets of the best matches (``_offsets``) and pastes back (``_paste``); ``_Call`` holds what the chunks
share (geometry, matching grids, masks, phase images, the cache of score rows).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import check_semantics, resize_nearest_tf

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
        semantics: how f, b and the mask are down-sampled by rate for matching. "torch" (default): pixel
            (i*r, j*r), and a mask cell is a hole if any of its r x r pixels is. "tf" (the TF release, for its
            converted weights): align_corners nearest resizes of all three (``models.layers.resize_nearest_tf``;
            64 -> 32 takes rows 0, 2, ..., 30, 33, ..., 63). Everything after the down-sampling is the same
            (the release's other differences, logits of invalid patches zeroed instead of -inf and the
            paste-back divided by 4 instead of the overlap count, are not reproduced).

    Invalid background patches (any hole pixel under the 3x3 matching patch on the downsampled mask, where
    a downsampled cell is a hole if any of its rate x rate pixels is; under "tf" if its one resized pixel is)
    get exactly zero attention: their logits are -inf. A sample without any valid background patch gets zero
    attention everywhere: its output y is 0 and its offsets are 0 (finite, documented fallback).

    Under bf16 / fp16 autocast (or with bf16 features) the matching (the Gram matrix and the scores), the
    propagation and the masked softmax run in float32, so the attention is that of float32 features of the
    same values (a bf16 Gram matrix moved whole rows of it by up to 0.05 in total variation); only the
    paste-back product runs in the autocast dtype. Float32 without autocast is unchanged.
    """

    def __init__(self, ksize: int = 3, stride: int = 1, rate: int = 2, fuse_k: int = 3,
                 softmax_scale: float = 10.0, fuse: bool = True,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES, semantics: str = "torch"):
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
        self.semantics = check_semantics(semantics)

    def extra_repr(self) -> str:
        return (f"ksize={self.ksize}, stride={self.stride}, rate={self.rate}, fuse_k={self.fuse_k}, "
                f"softmax_scale={self.softmax_scale}, fuse={self.fuse}, max_score_bytes={self.max_score_bytes}, "
                f"semantics={self.semantics!r}")

    def forward(self, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                rows: tuple[int, int] | None = None):
        """f: foreground features (B,C,H,W); b: background features (B,C,Hb,Wb); mask: (B,1,Hb,Wb), 1 = hole
        in b. H, W, Hb, Wb must be multiples of rate.

        Returns y (B,C,H,W) (f's shape, b's dtype; the autocast dtype under autocast) and offsets
        (B,2,H//rate,W//rate) int64: the (dy, dx) from each foreground position to its best-matching background
        position on the downsampled grid.

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
    # One call, in the order of the paper. Per chunk of foreground rows: the scores of its rows (and of the
    # halo rows the propagation reads), the propagation (fuse), the masked softmax, the offsets of the best
    # matches, the paste-back of the background patches. _Call holds what the chunks share.

    def _run(self, f, b, mask, keep_attention, rows=None):
        st = _Call(self, f, b, mask, rows)
        pieces = []  # paste-back outputs, one per chunk, in row order
        attn_all = [] if keep_attention else None
        prev_row = None  # last attention row of the previous chunk (B, w, Lb), for the paste-back overlap
        for r0, r1 in st.chunks():
            targets = torch.arange(r0 * st.w, r1 * st.w, device=st.device)  # (n,) row-major fg indices
            # scores -> fuse -> softmax. Each score block is handed on inline, so no name here keeps it alive:
            # the stage that uses it up frees it (CPython 3.11+ moves call arguments into the callee's frame).
            if self.fuse:
                mid, src = st.halo(targets)  # the propagation also reads the scores of neighbouring rows
                attn, best = self._softmax(
                    st, self._fuse(st, self._scores_for_rows(st, src), src, mid, targets))
            else:
                attn, best = self._softmax(st, self._scores_for_rows(st, list(range(r0, r1))))
            self._offsets(st, best, targets, r0, r1)
            if keep_attention:
                attn_all.append(attn)
            piece, prev_row = self._paste(st, attn, prev_row, last=r1 == st.row_hi)
            pieces.append(piece)
            st.evict(r1)
        y = self._stitch(st, pieces)
        attention = torch.cat(attn_all, 1) if keep_attention else None
        return y, st.offsets.view(st.B, 2, st.h, st.w), attention

    def _scores_for_rows(self, st: _Call, rows: list[int]) -> torch.Tensor:
        """Unfused scores of the sorted foreground rows `rows`: (B, len(rows)*w, Lb), st.score_dtype.

        Taken from the run cache st.runs; missing rows are computed first, one _score_run per run of
        consecutive missing rows. Rows that are one whole cached run come back as that tensor, a part of a run
        as a slice of it; rows from several runs are concatenated (a copy)."""
        w = st.w
        missing = [t for t in rows if st.run_of(t) is None]
        i = 0
        while i < len(missing):  # compute contiguous runs of missing rows
            j = i
            while j + 1 < len(missing) and missing[j + 1] == missing[j] + 1:
                j += 1
            st.runs.append((missing[i], missing[j] + 1, self._score_run(st, missing[i], missing[j] + 1)))
            i = j + 1
        pieces, i = [], 0
        while i < len(rows):
            a, c, S = st.run_of(rows[i])
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1 and rows[j + 1] < c:
                j += 1
            lo, hi = rows[i] - a, rows[j] + 1 - a
            pieces.append(S if (lo, hi) == (0, c - a) else S[:, lo * w:hi * w])
            i = j + 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)

    def _score_run(self, st: _Call, a: int, c: int) -> torch.Tensor:
        """Unfused scores of foreground rows [a, c) against every background patch: (B, (c-a)*w, Lb).

        The cosine-like similarity of the references, <patch_f(i,j), patch_b(p,q)> / |patch_b(p,q)|, as
        score[(i,j),(p,q)] = sum_uv G[(i+u,j+v),(p+u,q+v)] / |patch(p,q)| with G the Gram matrix of single
        feature vectors between the zero-padded f and b: the sum of G's k*k shifted diagonals."""
        B, n, w, hb, wb, p = st.B, c - a, st.w, st.hb, st.wb, st.p
        with torch.autocast(st.device.type, enabled=False):  # matching in score_dtype, also under autocast
            G = torch.bmm(st.fp[:, :, a:c + 2 * p].flatten(2).transpose(1, 2), st.bp_flat)  # (B, (n+2p)(w+2p), Lb')
        G = G.view(B, n + 2 * p, w + 2 * p, hb + 2 * p, wb + 2 * p)
        pairs = [(..., (slice(None), slice(u, u + n), slice(v, v + w), slice(u, u + hb), slice(v, v + wb)))
                 for u in range(st.k) for v in range(st.k)]
        S = _ShiftAdd.apply(G, (B, n, w, hb, wb), pairs)  # sum of the k*k shifted diagonals
        del G
        return S.reshape(B, n * w, st.Lb) * st.inv_norm  # (B, n*w, Lb)

    def _fuse(self, st: _Call, X: torch.Tensor, src: list[int], mid: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
        """Attention propagation: the (L x Lb) score map convolved with a fuse_k x fuse_k identity kernel, once
        in row-major and once in column-major flattening (of both grids), as sums of shifted diagonals.

        X (B, len(src)*w, Lb): unfused scores of the foreground rows src; mid, src from st.halo(targets). The
        row-major pass gives the positions mid, the column-major pass the targets (n,). Returns the fused scores
        (B, n, Lb), background row-major. X is dropped after the first pass (hand it over inline)."""
        B, h, w, hb, wb, L, Lb, fk, dev = st.B, st.h, st.w, st.hb, st.wb, st.L, st.Lb, st.fk, st.device
        src_rows = torch.tensor(src, device=dev)
        pos = torch.full((L,), -1, dtype=torch.int64, device=dev)  # position -> row of X (-1: not in X)
        pos.view(h, w)[src_rows] = torch.arange(len(src) * w, device=dev).view(len(src), w)
        X1 = _diag_pass(X, pos, mid, st.rm_shift, fk, Lb)  # (B, m, Lb)
        del X
        X1 = X1.view(B, -1, hb, wb).transpose(2, 3).reshape(B, -1, Lb)  # background in column-major
        pos = torch.full((L,), -1, dtype=torch.int64, device=dev)  # position -> row of X1
        pos[mid] = torch.arange(mid.numel(), device=dev)
        X2 = _diag_pass(X1, pos, targets, st.cm_shift, fk, Lb)  # (B, n, Lb)
        del X1
        return X2.view(B, -1, wb, hb).transpose(2, 3).reshape(B, -1, Lb)  # (B, n, Lb), back to row-major

    def _softmax(self, st: _Call, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked softmax over the background patches of softmax_scale * scores (B, n, Lb).

        Invalid patches get logit -inf (exactly zero attention); a sample without any valid patch gets zero
        attention everywhere (st.keep). Returns the attention (B, n, Lb) and the best patch of each position
        (B, n) int64 (argmax of the logits). The scores are dropped once the logits exist (hand them over
        inline)."""
        logits = (scores * self.softmax_scale).masked_fill(st.invalid, float("-inf"))  # (B, n, Lb)
        del scores
        best = logits.argmax(-1)  # (B, n)
        return torch.softmax(logits, dim=-1) * st.keep, best  # (B, n, Lb)

    def _offsets(self, st: _Call, best: torch.Tensor, targets: torch.Tensor, r0: int, r1: int) -> None:
        """Write the (dy, dx) from each target (n,) of rows [r0, r1) to its best patch (B, n) into st.offsets
        (0 for a sample without valid patch)."""
        fy, fx = targets // st.w, targets % st.w  # (n,) each
        st.offsets[:, 0, r0 * st.w:r1 * st.w] = (best // st.wb - fy) * st.any_valid[:, None]
        st.offsets[:, 1, r0 * st.w:r1 * st.w] = (best % st.wb - fx) * st.any_valid[:, None]

    def _paste(self, st: _Call, attn: torch.Tensor, prev_row: torch.Tensor | None, last: bool):
        """Paste-back of one chunk: the transposed convolution of the attention with the 2r x 2r background
        patches at stride r, as one matrix product with the phase images st.P.

        attn (B, nr*w, Lb) of the foreground rows [r0, r1); prev_row (B, w, Lb) the attention of row r0-1 (None
        on the band's first chunk). The chunk writes output rows I in [r0, r1) (and I = r1 on the band's last
        chunk, `last`, which only the band's last row reaches; I = h is the padded row):
        A[I] = sum_{di,dj in {0,1}} attn[I-di, J-dj] shifted by (di, dj) in the background.
        Returns the chunk's output (B, C, no*r, (w+1)*r), no = nr (+1 when last), and the chunk's last
        attention row (B, w, Lb), the next chunk's prev_row."""
        B, C, r, w, hb, wb, Lb = st.B, st.C, st.r, st.w, st.hb, st.wb, st.Lb
        nr = attn.shape[1] // w
        first = prev_row if prev_row is not None else attn.new_zeros(B, w, Lb)
        ext = [first.unsqueeze(1), attn.view(B, nr, w, Lb)]
        if last:
            ext.append(attn.new_zeros(B, 1, w, Lb))
        ext = torch.cat(ext, 1).view(B, -1, w, hb, wb)  # (B, ne, w, hb, wb), rows r0-1 ...
        prev_row = attn.view(B, nr, w, Lb)[:, -1]
        no = ext.shape[1] - 1  # output rows of this chunk
        pairs = [((slice(None), slice(None), slice(dj, dj + w), slice(di, di + hb), slice(dj, dj + wb)),
                  (slice(None), slice(1 - di, 1 - di + no))) for di in (0, 1) for dj in (0, 1)]
        A = _ShiftAdd.apply(ext, (B, no, w + 1, hb + 1, wb + 1), pairs)  # (B, no, w+1, hb+1, wb+1)
        del ext
        A = A.view(B, no * (w + 1), (hb + 1) * (wb + 1))  # (B, no*(w+1), Lb')
        out = torch.bmm(A.to(st.P.dtype), st.P)  # (B, no*(w+1), r*r*C)
        del A
        out = out.view(B, no, w + 1, r, r, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, no, r, w+1, r)
        return out.reshape(B, C, no * r, (w + 1) * r), prev_row

    def _stitch(self, st: _Call, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The chunks' paste-back outputs as y (B, C, H, W), b's dtype: nothing pasted outside the band, the
        phase grid's padding cropped, each pixel divided by the number of patches overlapping it."""
        B, C, h, w, r = st.B, st.C, st.h, st.w, st.r
        if not pieces:  # an empty band: nothing attended
            y = st.P.new_zeros(B, C, (h + 1) * r, (w + 1) * r)
        else:
            y = torch.cat(pieces, 2) if len(pieces) > 1 else pieces[0]  # (B, C, (row_hi-row_lo+1)r, (w+1)r)
            if (st.row_lo, st.row_hi) != (0, h):  # rows outside the band: nothing pasted
                y = F.pad(y, (0, 0, st.row_lo * r, (h - st.row_hi) * r))
        y = y[:, :, r // 2:r // 2 + st.H, r // 2:r // 2 + st.W]
        return y / _overlap_count(h, w, r, y.dtype, st.device)


class _Call:
    """What one ContextualAttention call shares between its chunks of foreground rows.

    Sizes on the matching grid (f and b downsampled by r = rate): foreground h x w (L = h*w positions) and
    background hb x wb (Lb = hb*wb patches), both flattened row-major; patch size k = 2p+1; propagation
    half-width fk. Attended rows [row_lo, row_hi), rows_per_chunk at a time (chunks()). Tensors: fp
    (B,C,h+2p,w+2p) and bp_flat (B,C,(hb+2p)*(wb+2p)) the zero-padded matching grids; inv_norm (B,1,Lb)
    1 / |background patch|; any_valid (B,) bool; invalid (B,1,Lb) bool, the patches with logit -inf; keep
    (B,1,1) 0 for a sample without valid patch; P (B,(hb+1)*(wb+1),r*r*C) the paste-back phase images;
    offsets (B,2,L) int64, filled chunk by chunk. runs: the cache of unfused scores, a list of
    (first row, end row, scores (B, rows*w, Lb)), dropped by evict() once no later chunk reads them.
    """

    def __init__(self, att: ContextualAttention, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                 rows: tuple[int, int] | None):
        B, C, H, W = f.shape
        Hb, Wb = b.shape[-2:]
        r, k = att.rate, att.ksize
        if b.shape[:2] != (B, C):
            raise ValueError(f"f and b must agree in batch and channels, got {tuple(f.shape)} and {tuple(b.shape)}")
        if mask.shape != (B, 1, Hb, Wb):
            raise ValueError(f"mask must be (B,1,Hb,Wb) = {(B, 1, Hb, Wb)}, got {tuple(mask.shape)}")
        if H % r or W % r or Hb % r or Wb % r:
            raise ValueError(f"feature sizes must be multiples of rate={r}, got {H}x{W} and {Hb}x{Wb}")
        h, w, hb, wb = H // r, W // r, Hb // r, Wb // r
        self.B, self.C, self.H, self.W, self.r, self.k, self.p = B, C, H, W, r, k, k // 2
        self.h, self.w, self.hb, self.wb, self.L, self.Lb = h, w, hb, wb, h * w, hb * wb
        self.row_lo, self.row_hi = (0, h) if rows is None else (max(0, int(rows[0])), min(h, int(rows[1])))
        self.fk = att.fuse_k // 2
        self.device = dev = f.device
        self.score_dtype = torch.promote_types(f.dtype, torch.float32)
        p, Lb = self.p, self.Lb

        # Matching grid: nearest downsampling (_downsample), zero 'same' padding for the k x k patches.
        fd, bd, md = _downsample(att.semantics, f, b, mask.to(self.score_dtype), r)
        fd, bd = fd.to(self.score_dtype), bd.to(self.score_dtype)  # bf16 / fp16 features: match in float32
        self.fp = F.pad(fd, (p, p, p, p))  # (B, C, h+2p, w+2p)
        del fd
        self.bp_flat = F.pad(bd, (p, p, p, p)).flatten(2)  # (B, C, (hb+2p)*(wb+2p))
        # L2 norm of each background k x k patch (zero padding), clamped like the reference.
        sq = bd.to(self.score_dtype).square().sum(1, keepdim=True)  # (B, 1, hb, wb)
        norm2 = F.avg_pool2d(sq, k, stride=1, padding=p, count_include_pad=True) * (k * k)
        self.inv_norm = norm2.clamp_min(0).sqrt().clamp_min(1e-4).reciprocal().view(B, 1, Lb)  # (B, 1, Lb)
        # Valid background patches: no hole anywhere under the patch.
        valid = (F.max_pool2d(md, k, stride=1, padding=p) < 0.5).view(B, Lb)  # (B, Lb)
        self.any_valid = valid.any(1)  # (B,)
        # (B, 1, Lb) logits set to -inf; a sample without any valid patch keeps all (zeroed by keep)
        self.invalid = (~(valid | ~self.any_valid[:, None])).view(B, 1, Lb)
        self.keep = self.any_valid.to(self.score_dtype).view(B, 1, 1)  # zero attention without valid background

        # Paste-back phase images of b: P[(t,s), (a,c,ch)] = b_pad[ch, t*r + a, s*r + c].
        bpad = F.pad(b, (r // 2, r - r // 2, r // 2, r - r // 2))  # (B, C, (hb+1)r, (wb+1)r)
        P = bpad.view(B, C, hb + 1, r, wb + 1, r).permute(0, 2, 4, 3, 5, 1)  # (B, hb+1, wb+1, r, r, C)
        self.P = P.reshape(B, (hb + 1) * (wb + 1), r * r * C)  # (B, Lb', r*r*C)

        rows_per_chunk = max(1, att.max_score_bytes // max(1, B * w * Lb * 4))
        self.rows_per_chunk = min(rows_per_chunk, max(1, self.row_hi - self.row_lo))
        self.runs: list[tuple[int, int, torch.Tensor]] = []
        self.offsets = torch.zeros(B, 2, self.L, dtype=torch.int64, device=dev)

    def chunks(self):
        """(r0, r1) of each chunk of attended foreground rows, top to bottom."""
        for r0 in range(self.row_lo, self.row_hi, self.rows_per_chunk):
            yield r0, min(self.row_hi, r0 + self.rows_per_chunk)

    def rm_shift(self, a: torch.Tensor, d: int):
        """Row-major flat index a + d: (index clamped into range, valid mask)."""
        s = a + d
        ok = (s >= 0) & (s < self.L)
        return s.clamp(0, self.L - 1), ok

    def cm_shift(self, a: torch.Tensor, d: int):
        """Shift row-major index a by d in column-major flat order: (row-major index, valid mask)."""
        h, w = self.h, self.w
        c = (a % w) * h + a // w + d
        ok = (c >= 0) & (c < h * w)
        c = c.clamp(0, h * w - 1)
        return (c % h) * w + c // h, ok

    def halo(self, targets: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """What the propagation of the targets (n,) reads: mid, the sorted positions the column-major pass
        reads (the targets' column-major neighbours), and the sorted foreground rows whose scores the
        row-major pass reads (those of mid's row-major neighbours)."""
        fk = self.fk
        mid = _unique(torch.cat([self.cm_shift(targets, d)[0] for d in range(-fk, fk + 1)]))
        need = _unique(torch.cat([self.rm_shift(mid, d)[0] for d in range(-fk, fk + 1)]))
        return mid, sorted(set((need // self.w).tolist()))

    def run_of(self, t: int):
        """The cached run (first row, end row, scores) that holds foreground row t, or None."""
        for run in self.runs:
            if run[0] <= t < run[1]:
                return run
        return None

    def evict(self, r1: int) -> None:
        """Forget the runs no chunk after the one ending at row r1 needs (a run holding rows 0..fk stays: the
        last chunk's column-major wrap-around needs them)."""
        fk = self.fk
        self.runs[:] = [run for run in self.runs if run[0] <= fk or run[1] > r1 - 2 * fk - 2]


def _downsample(semantics: str, f: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, r: int):
    """f (B,C,H,W), b (B,C,Hb,Wb), mask (B,1,Hb,Wb) on the matching grid (each side / r): (fd, bd, md).
    "torch": pixel (i*r, j*r) of f and b; a mask cell is a hole if any of its r x r pixels is.
    "tf": the TF release's align_corners nearest resize of all three (a mask cell takes one pixel)."""
    if semantics == "tf":
        H, W = f.shape[-2:]
        Hb, Wb = b.shape[-2:]
        return (resize_nearest_tf(f, (H // r, W // r)), resize_nearest_tf(b, (Hb // r, Wb // r)),
                resize_nearest_tf(mask, (Hb // r, Wb // r)))
    return f[:, :, ::r, ::r], b[:, :, ::r, ::r], F.max_pool2d(mask, r)


def _overlap_line(n: int, r: int, dtype, device) -> torch.Tensor:
    """Number of pasted 2r-wide patches covering each of n*r output pixels along one axis: (n*r,)."""
    c = torch.full((n + 1,), 2.0, dtype=dtype, device=device)
    c[0] = c[-1] = 1.0
    return c.repeat_interleave(r)[r // 2:r // 2 + n * r]


def _overlap_count(h: int, w: int, r: int, dtype, device) -> torch.Tensor:
    """Number of pasted 2r x 2r patches covering each output pixel: (1, 1, h*r, w*r)."""
    return (_overlap_line(h, r, dtype, device)[:, None] * _overlap_line(w, r, dtype, device)[None, :]).view(
        1, 1, h * r, w * r)


def _unique(t: torch.Tensor) -> torch.Tensor:
    return torch.unique(t, sorted=True)


def _diag_pass(X, pos, targets, shift, fk, Lb):
    """One propagation pass: out[t, j] = sum_d X[shift(t, d), j + d] (zero outside the ranges).

    X: (B, n_src, Lb) rows indexed through pos (global index -> row of X); targets: global indices (n,);
    shift(t, d) -> (shifted global index, valid mask) (_Call.rm_shift or _Call.cm_shift). Returns (B, n, Lb)."""
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

