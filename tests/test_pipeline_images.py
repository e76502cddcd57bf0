"""pipeline.images and pipeline.storage: decoding every awkward kind correctly, rejecting every bad kind with
its reason, masks from files, and credential redaction. No Ray, no S3 server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (IMAGE_SUFFIXES, ImageRejected, _decode_plain_jpeg, decode_image, decode_mask, encode_png,
                             probe_image)
from pipeline.storage import join, list_files, read_bytes, redact, write_bytes_atomic
from tests.imaging import AWKWARD, BAD, GOOD_PHOTOS, SMALL, encode, photo, png_bomb

BASE = photo("astronaut")[::2, ::2]  # what tests/imaging.py derives the awkward files from, (256, 256, 3)


def _read(root, key):
    return (root / key).read_bytes()


def test_good_photos_decode_to_their_pixels(good_images_dir):
    for name, key in GOOD_PHOTOS.items():
        img = decode_image(_read(good_images_dir, key))
        ref = photo(name)
        assert img.dtype == np.uint8 and img.shape == ref.shape
        err = np.abs(img.astype(int) - ref.astype(int)).mean()
        if key.endswith(".png"):
            assert err == 0  # lossless
        else:
            assert err < 6  # JPEG / WebP at quality 92


def test_awkward_images_convert_to_rgb(bad_images_dir):
    root, _ = bad_images_dir
    gray = decode_image(_read(root, AWKWARD["grayscale"]))
    assert gray.shape == (256, 256, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    expect_gray = np.asarray(Image.fromarray(BASE).convert("L"))
    assert (gray[..., 0] == expect_gray).all()

    rgba = decode_image(_read(root, AWKWARD["rgba"]))
    assert (rgba == BASE).all()  # alpha dropped, colours kept exactly

    sixteen = decode_image(_read(root, AWKWARD["sixteen_bit"]))
    assert (sixteen[..., 0] == BASE[..., 0]).all()  # v * 257 -> v: scaled down, not clipped to 255

    palette = decode_image(_read(root, AWKWARD["palette"]))
    assert palette.shape == (256, 256, 3) and np.abs(palette.astype(int) - BASE).mean() < 8

    cmyk = decode_image(_read(root, AWKWARD["cmyk"]))
    assert cmyk.shape == (256, 256, 3) and np.abs(cmyk.astype(int) - BASE).mean() < 8  # not inverted

    rotated = decode_image(_read(root, AWKWARD["exif_rotated"]))
    assert rotated.shape == (256, 128, 3)  # stored 256 wide x 128 high, orientation 6 -> displayed 128 x 256
    expect = np.rot90(BASE[:128], k=-1)  # 90 degrees clockwise
    assert np.abs(rotated.astype(int) - expect).mean() < 8


@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"progressive": True}, {"quality": 40}, {"gray": True}])
def test_jpeg_fast_path_gives_pils_pixels(options):
    """decode_image reads plain JPEGs through OpenCV: the pixels must be exactly PIL's."""
    options = dict(options)
    img = Image.fromarray(BASE).convert("L") if options.pop("gray", False) else Image.fromarray(BASE)
    data = encode(img, "JPEG", **options)
    ours = decode_image(data)
    with Image.open(io.BytesIO(data)) as ref:
        assert _decode_plain_jpeg(data, ref) is not None  # the fast path did take it
        expect = np.asarray(ref.convert("RGB"))
    assert ours.dtype == np.uint8 and ours.shape == expect.shape and (ours == expect).all()


def test_jpegs_the_fast_path_must_not_take_still_decode_right(bad_images_dir):
    """Truncated (no end-of-image marker), EXIF-rotated and CMYK JPEGs go through PIL."""
    root, _ = bad_images_dir
    data = encode(Image.fromarray(BASE), "JPEG", quality=90)
    for other in (data[: len(data) * 2 // 3], _read(root, AWKWARD["exif_rotated"]), _read(root, AWKWARD["cmyk"])):
        with Image.open(io.BytesIO(other)) as header:
            assert _decode_plain_jpeg(other, header) is None
    with pytest.raises(ImageRejected) as err:
        decode_image(data[: len(data) * 2 // 3])
    assert err.value.reason == "truncated"
    assert decode_image(data + b"\0\0").shape == (256, 256, 3)  # trailing bytes after the end marker
    assert decode_image(_read(root, AWKWARD["exif_rotated"])).shape == (256, 128, 3)


def test_palette_with_transparency_and_adobe_cmyk():
    # palette PNG with a transparent index: expanded through the palette, alpha dropped
    pal = Image.fromarray(BASE).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    out = decode_image(encode(pal, "PNG", transparency=0))
    assert out.shape == (256, 256, 3) and np.abs(out.astype(int) - BASE).mean() < 16
    # CMYK JPEG: PIL writes an Adobe (inverted) CMYK file; it must come back as the original colours
    data = encode(Image.fromarray(BASE).convert("CMYK"), "JPEG", quality=95)
    assert b"Adobe" in data
    assert np.abs(decode_image(data).astype(int) - BASE).mean() < 8


@pytest.mark.parametrize("kind,reason", [
    ("empty", "empty"), ("not_image", "not_an_image"), ("truncated", "truncated"),
    ("corrupt", "corrupt"), ("bomb", "decompression_bomb"),
])
def test_bad_files_are_rejected_with_reasons(bad_images_dir, kind, reason):
    root, _ = bad_images_dir
    with pytest.raises(ImageRejected) as err:
        decode_image(_read(root, BAD[kind]))
    assert err.value.reason == reason


def test_bombs_are_rejected_from_the_header_before_decoding(bad_images_dir):
    # 3000 x 3000 claimed, far below PIL's own limit; the pixel data is junk, so only a header check can
    # give "decompression_bomb" (decoding would say truncated / corrupt)
    data = png_bomb(3000, 3000)
    with pytest.raises(ImageRejected) as err:
        decode_image(data, max_pixels=1_000_000)
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(ImageRejected) as err:
        decode_image(data, max_pixels=10_000_000)
    assert err.value.reason in ("truncated", "corrupt")


def test_min_size_and_probe(bad_images_dir):
    root, _ = bad_images_dir
    small = _read(root, SMALL["small"])
    assert decode_image(small).shape == (40, 56, 3)
    with pytest.raises(ImageRejected) as err:
        decode_image(small, min_size=41)
    assert err.value.reason == "too_small"
    info = probe_image(_read(root, AWKWARD["exif_rotated"]))
    assert (info.height, info.width, info.format) == (256, 128, "JPEG")


def test_decode_mask_polarity_threshold_and_modes():
    h, w = 8, 10
    gray = np.zeros((h, w), np.uint8)
    gray[2:5, 3:7] = 255
    gray[0, 0] = 128  # at half: hole
    gray[0, 1] = 127  # below half: known
    want = (gray >= 128).astype(np.uint8)
    for img in (Image.fromarray(gray), Image.fromarray(gray).convert("RGB")):
        m = decode_mask(encode(img, "PNG"), h, w)
        assert m.dtype == np.uint8 and (m == want).all()
    # RGBA: white strokes on a transparent background
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = np.where(gray == 255, 255, 0)
    assert (decode_mask(encode(Image.fromarray(rgba, "RGBA"), "PNG"), h, w) == (gray == 255)).all()
    with pytest.raises(ImageRejected) as err:
        decode_mask(encode(Image.fromarray(gray), "PNG"), h + 1, w)
    assert err.value.reason == "mask_size_mismatch"
    with pytest.raises(ImageRejected) as err:
        decode_mask(b"", h, w)
    assert err.value.reason == "empty_mask"


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-XYZ")
    text = "failed: key s3cr3t-value-XYZ at http://user:pw@host:9000/b?x=1 secret_key=abc123 token: t0k"
    out = redact(text)
    for leaked in ("s3cr3t-value-XYZ", "user:pw", "abc123", "t0k"):
        assert leaked not in out
    assert "host:9000/b" in out


def test_local_storage_roundtrip(tmp_path):
    uri = join(f"file://{tmp_path}", "a", "b.bin")
    write_bytes_atomic(uri, b"hello")
    write_bytes_atomic(join(str(tmp_path), "c.txt"), b"x")
    assert read_bytes(uri) == b"hello"
    assert list_files(str(tmp_path)) == ["a/b.bin", "c.txt"]
    assert list_files(f"file://{tmp_path}", (".BIN",)) == ["a/b.bin"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]  # no temporary file left


@pytest.mark.parametrize("compression", [0, 1, 9])
def test_encode_png_round_trips_exactly(compression):
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), BASE, BASE[::-1, ::2]):  # noise, photo, a view
        data = encode_png(arr, compression=compression)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        back = decode_image(data)
        assert back.dtype == np.uint8 and back.shape == arr.shape and (back == arr).all()  # RGB order kept
    assert len(encode_png(BASE, 9)) < len(encode_png(BASE, 0))


@pytest.mark.parametrize("bad", [
    np.zeros((8, 8), np.uint8),  # grayscale-shaped
    np.zeros((8, 8, 1), np.uint8),
    np.zeros((8, 8, 4), np.uint8),  # RGBA
    np.zeros((8, 8, 3), np.float32),  # float
    np.zeros((8, 8, 3), np.uint16),
    np.zeros((0, 8, 3), np.uint8),  # empty
])
def test_encode_png_rejects_other_shapes_and_dtypes(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


def test_encode_png_rejects_a_bad_compression_level():
    with pytest.raises(ValueError):
        encode_png(BASE, compression=10)


def test_image_suffixes():
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)
