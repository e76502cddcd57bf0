"""ContextualAttention against a direct per-sample implementation of the reference definition."""

import pytest
import torch
import torch.nn.functional as F

from models import ContextualAttention
from models.reference import reference_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(B=3, C=6, H=16, W=20, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    b = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    mask = torch.zeros(B, 1, H, W, dtype=dtype)
    mask[0, :, 2:9, 3:11] = 1
    mask[1, :, 8:16, 0:6] = 1
    mask[1, :, 1:4, 14:19] = 1  # two holes
    # sample 2: no hole
    return f, b, mask


@pytest.mark.parametrize("fuse", [True, False])
def test_matches_reference_definition(fuse):
    f, b, mask = _inputs()
    att = ContextualAttention(fuse=fuse)
    y, off = att(f, b, mask)
    y_ref, off_ref = reference_attention(f, b, mask, fuse=fuse)
    assert y.shape == f.shape and off.shape == (3, 2, 8, 10) and off.dtype == torch.int64
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(off, off_ref)


def test_self_attention_different_sizes():
    f, b, mask = _inputs(B=2, H=20, W=12)
    y, off = ContextualAttention()(f, f, mask)
    y_ref, off_ref = reference_attention(f, f, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(off, off_ref)


def test_batched_equals_per_sample():
    f, b, mask = _inputs()
    att = ContextualAttention()
    y, off = att(f, b, mask)
    for i in range(f.shape[0]):
        yi, oi = att(f[i:i + 1], b[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(y[i:i + 1], yi, rtol=1e-12, atol=1e-12)
        assert torch.equal(off[i:i + 1], oi)


@pytest.mark.parametrize("fuse", [True, False])
def test_chunked_equals_unchunked(fuse):
    f, b, mask = _inputs(H=20, W=16)
    att = ContextualAttention(fuse=fuse)
    f.requires_grad_(True)
    y, off = att(f, b, mask)
    (gf,) = torch.autograd.grad(y.square().sum(), f)
    h, w, Lb = 10, 8, 80
    for rows in (1, 2, 3, 7):
        att.max_score_bytes = 3 * w * Lb * 4 * rows  # exactly `rows` foreground rows per chunk
        yc, oc = att(f, b, mask)
        (gfc,) = torch.autograd.grad(yc.square().sum(), f)
        torch.testing.assert_close(yc, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gfc, gf, rtol=1e-10, atol=1e-10)
        assert torch.equal(oc, off)


@pytest.mark.parametrize("rows", [None, 1, 3])
@pytest.mark.parametrize("max_runs", [64, 0])
def test_values_and_gradients_match_reference_definition(rows, max_runs, monkeypatch):
    """The hand-written backwards (shifted-diagonal sums, propagation passes) against autograd through the
    reference definition, unchunked and chunked; max_runs=0 forces the propagation's gather fallback."""
    import models.attention

    monkeypatch.setattr(models.attention, "_MAX_RUNS", max_runs)
    f, b, mask = _inputs(H=20, W=16)
    att = ContextualAttention()
    if rows is not None:
        att.max_score_bytes = 3 * 8 * 80 * 8 * rows  # `rows` foreground rows per chunk (float64)
    wy = torch.randn(f.shape, generator=torch.Generator().manual_seed(1), dtype=f.dtype)
    ys, grads = [], []
    for fn in (lambda f, b: att(f, b, mask)[0], lambda f, b: reference_attention(f, b, mask)[0]):
        fi, bi = f.clone().requires_grad_(True), b.clone().requires_grad_(True)
        ys.append(fn(fi, bi))
        grads.append(torch.autograd.grad((ys[-1] * wy).sum(), (fi, bi)))
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-9, atol=1e-9)
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", [(3, 7), (6, 10), (0, 2), (4, 4)])
@pytest.mark.parametrize("chunk_rows", [None, 1, 2])
def test_row_band_equals_full_attention_inside(rows, chunk_rows):
    """rows=(a, b): grid rows a..b-1 attend exactly as without a band (offsets, and every feature row all
    of whose pasted patches come from the band); nothing is pasted beyond the band's patches."""
    f, b, mask = _inputs(H=20, W=16)
    att = ContextualAttention()
    y_full, off_full = att(f, b, mask)
    if chunk_rows is not None:
        att.max_score_bytes = 3 * 8 * 80 * 8 * chunk_rows
    y, off = att(f, b, mask, rows=rows)
    a, e = rows
    assert (off[:, :, :a] == 0).all() and (off[:, :, e:] == 0).all()
    assert torch.equal(off[:, :, a:e], off_full[:, :, a:e])
    # grid row i pastes on feature rows [2i - 1, 2i + 3)
    exact = [yr for yr in range(20) if all(a <= i < e for i in range(10) if 2 * i - 1 <= yr < 2 * i + 3)]
    torch.testing.assert_close(y[:, :, exact], y_full[:, :, exact], rtol=1e-12, atol=1e-12)
    reached = set(yr for i in range(a, e) for yr in range(2 * i - 1, 2 * i + 3))
    beyond = [yr for yr in range(20) if yr not in reached]
    assert (y[:, :, beyond] == 0).all()
    assert len(exact) > 0 or e - a < 2


def test_invalid_patches_get_zero_attention():
    f, b, mask = _inputs(dtype=torch.float32)
    att = ContextualAttention()
    a = att.attention(f, b, mask)  # (B, L, Lb)
    md = F.max_pool2d(mask, 2)
    valid = (F.max_pool2d(md, 3, stride=1, padding=1) < 0.5).view(3, 1, -1).expand_as(a)
    assert (~valid).any() and valid.any()
    assert torch.all(a[~valid] == 0)  # exactly zero
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]))
    # without propagation, changing b inside the holes (only invalid patches see those pixels) leaves y unchanged
    att = ContextualAttention(fuse=False)
    b2 = b + 100.0 * mask
    y1, o1 = att(f, b, mask)
    y2, o2 = att(f, b2, mask)
    assert torch.equal(o1, o2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


def test_all_invalid_sample_is_finite_and_zero():
    f, b, mask = _inputs(dtype=torch.float32)
    mask[2] = 1  # sample 2: every background patch invalid
    f.requires_grad_(True)
    y, off = ContextualAttention()(f, b, mask)
    assert torch.isfinite(y).all() and torch.all(y[2] == 0) and torch.all(off[2] == 0)
    y.sum().backward()
    assert torch.isfinite(f.grad).all()


def test_picks_exactly_matching_patch_and_offset_points_there():
    # Features on the 8x8 matching grid, upsampled x2 so nearest downsampling recovers them exactly.
    g = torch.Generator().manual_seed(1)
    low = torch.randn(1, 16, 8, 8, generator=g)
    dy, dx = 4, 3
    low[:, :, 5:8, 4:8] = low[:, :, 5 - dy:8 - dy, 4 - dx:8 - dx]  # the hole content exists in the background
    feat = low.repeat_interleave(2, 2).repeat_interleave(2, 3)  # (1, 16, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[:, :, 10:16, 8:16] = 1  # the copied region is the hole
    y, off = ContextualAttention()(feat, feat, mask)
    # an interior hole position (6, 6) on the matching grid: its patch matches the source exactly
    assert off[0, :, 6, 6].tolist() == [-dy, -dx]
    src = feat[:, :, 2 * (6 - dy):2 * (6 - dy) + 2, 2 * (6 - dx):2 * (6 - dx) + 2]
    torch.testing.assert_close(y[:, :, 12:14, 12:14], src, atol=1e-3, rtol=1e-3)


def test_bf16_autocast_cpu():
    f, b, mask = _inputs(dtype=torch.float32)
    att = ContextualAttention()
    att.max_score_bytes = 3 * 10 * 80 * 4  # chunked path too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, off = att(f, b, mask)
    assert y.shape == f.shape and torch.isfinite(y.float()).all()

