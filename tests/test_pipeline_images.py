"""pipeline.images and pipeline.storage: decoding every awkward kind correctly, rejecting every bad kind with
its reason, masks from files, and credential redaction. No Ray, no S3 server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (IMAGE_SUFFIXES, REASONS, ImageRejected, _check_jpeg, decode_image, decode_mask, encode_png,
                             probe_image)
from pipeline.storage import join, list_files, read_bytes, redact, write_bytes_atomic
from tests.imaging import (AWKWARD, BAD, EXTREME, GOOD_PHOTOS, HOSTILE, SMALL, corrupt_scan_jpeg, encode,
                           gif_many_frames, other_format_files, photo, png_bomb, write_hostile_images)

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
    """decode_image reads plain JPEGs through simplejpeg alone: the pixels must be exactly PIL's (grayscale
    replicated to 3 channels as PIL's L -> RGB does)."""
    options = dict(options)
    img = Image.fromarray(BASE).convert("L") if options.pop("gray", False) else Image.fromarray(BASE)
    data = encode(img, "JPEG", **options)
    ours = decode_image(data)
    with Image.open(io.BytesIO(data)) as ref:
        assert _check_jpeg(data, ref) is not None  # the fast path did take it
        expect = np.asarray(ref.convert("RGB"))
    assert ours.dtype == np.uint8 and ours.shape == expect.shape and (ours == expect).all()


def test_jpegs_the_fast_path_must_not_take_still_decode_right(bad_images_dir):
    """EXIF-rotated and CMYK JPEGs are checked by simplejpeg, then decoded by PIL; truncated ones are rejected."""
    root, _ = bad_images_dir
    data = encode(Image.fromarray(BASE), "JPEG", quality=90)
    for other in (_read(root, AWKWARD["exif_rotated"]), _read(root, AWKWARD["cmyk"])):
        with Image.open(io.BytesIO(other)) as header:
            assert _check_jpeg(other, header) is None
    for cut in (data[: len(data) * 2 // 3], data[:-2]):  # cut in the scan; only the end-of-image marker missing
        with pytest.raises(ImageRejected) as err:
            decode_image(cut)
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
    assert err.value.reason == "mask_empty"


def test_mask_reasons_are_the_image_reasons_prefixed():
    image_codes = [r for r in REASONS if not r.startswith("mask_")]
    assert sorted(r for r in REASONS if r.startswith("mask_")) == sorted(
        ["mask_size_mismatch"] + ["mask_" + r for r in image_codes if r != "too_small"])
    assert "empty_mask" not in REASONS


def _bad_masks() -> dict[str, tuple[bytes, str]]:
    """kind -> (bytes of a mask meant for an 8 x 10 image, reason)."""
    gray = Image.fromarray(np.zeros((8, 10), np.uint8))
    jpeg = encode(gray, "JPEG")
    noise = np.random.default_rng(0).integers(0, 2, (8, 10), dtype=np.uint8) * 255
    png = bytearray(encode(Image.fromarray(noise), "PNG", compress_level=0))
    idat = png.index(b"IDAT") + 4
    png[idat : idat + 2] = b"\xff\xff"  # a broken zlib header: the pixel stream cannot be inflated
    return {
        "empty": (b"", "mask_empty"),
        "other_format": (other_format_files()["ppm"], "mask_not_an_image"),
        "text": (b"<html></html>", "mask_not_an_image"),
        "truncated": (jpeg[:-2], "mask_truncated"),
        "corrupt": (bytes(png), "mask_corrupt"),
        "bomb": (png_bomb(), "mask_decompression_bomb"),
        "size": (encode(Image.fromarray(np.zeros((8, 11), np.uint8)), "PNG"), "mask_size_mismatch"),
    }


@pytest.mark.parametrize("kind", list(_bad_masks()))
def test_bad_masks_get_mask_reasons(kind):
    data, reason = _bad_masks()[kind]
    with pytest.raises(ImageRejected) as err:
        decode_mask(data, 8, 10)
    assert err.value.reason == reason


def test_mask_size_is_checked_from_the_header_after_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 10 wide x 8 high, displayed 8 wide x 10 high
    data = encode(Image.fromarray(np.full((8, 10), 255, np.uint8)), "JPEG", exif=exif.tobytes())
    assert decode_mask(data, 10, 8).shape == (10, 8)
    with pytest.raises(ImageRejected) as err:
        decode_mask(data, 8, 10)
    assert err.value.reason == "mask_size_mismatch"
    with pytest.raises(ImageRejected) as err:  # a bomb-sized mask is refused without decoding its pixels
        decode_mask(png_bomb(6000, 6000), 10, 8)
    assert err.value.reason == "mask_size_mismatch"


def test_byte_cap_rejects_before_decoding():
    data = encode(Image.fromarray(BASE), "PNG")
    assert decode_image(data, max_bytes=len(data)).shape == (256, 256, 3)
    for call in (decode_image, probe_image):
        with pytest.raises(ImageRejected) as err:
            call(data, max_bytes=len(data) - 1)
        assert err.value.reason == "too_large"
    with pytest.raises(ImageRejected) as err:
        decode_mask(data, 256, 256, max_bytes=100)
    assert err.value.reason == "mask_too_large"
    with pytest.raises(ImageRejected) as err:  # the cap comes before parsing: junk over it is too_large too
        decode_image(b"junk" * 100, max_bytes=399)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("name", list(other_format_files()))
def test_other_formats_are_not_images_and_start_no_program(name, monkeypatch):
    import subprocess

    def no_programs(*args, **kwargs):
        raise AssertionError(f"decoding started a program: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_programs)
    data = other_format_files()[name]
    for call in (decode_image, probe_image):
        with pytest.raises(ImageRejected) as err:
            call(data)
        assert err.value.reason == "not_an_image"
    with pytest.raises(ImageRejected) as err:
        decode_mask(data, 32, 32)
    assert err.value.reason == "mask_not_an_image"


def test_pil_alone_would_open_eps():
    """What FORMATS guards against: PIL opens EPS by default, and loading it runs Ghostscript."""
    with Image.open(io.BytesIO(other_format_files()["eps"])) as img:
        assert img.format == "EPS"


def test_hostile_files_are_rejected_with_reasons(tmp_path):
    kinds = write_hostile_images(tmp_path)
    for kind, (key, reason) in HOSTILE.items():
        assert kinds[key] == kind
        with pytest.raises(ImageRejected) as err:
            decode_image((tmp_path / key).read_bytes())
        assert err.value.reason == reason, kind
    assert decode_image((tmp_path / EXTREME["tall"]).read_bytes()).shape == (20000, 1, 3)
    assert decode_image((tmp_path / EXTREME["wide"]).read_bytes()).shape == (1, 20000, 3)
    assert (decode_image((tmp_path / EXTREME["dot"]).read_bytes()) == [200, 30, 10]).all()


def test_jpegs_pil_and_opencv_accept_with_grey_rows_are_rejected():
    import cv2

    rgb = Image.fromarray(BASE)
    exif = Image.Exif()
    exif[0x0112] = 6
    for data in (corrupt_scan_jpeg(rgb), corrupt_scan_jpeg(rgb.convert("L")),  # fast path
                 corrupt_scan_jpeg(rgb.convert("CMYK")), corrupt_scan_jpeg(rgb, exif=exif.tobytes())):  # checked
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # PIL decodes it without complaint
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # so does OpenCV
        with pytest.raises(ImageRejected) as err:
            decode_image(data)
        assert err.value.reason == "corrupt"
    cut = encode(rgb.convert("CMYK"), "JPEG")[:-2]
    with pytest.raises(ImageRejected) as err:
        decode_image(cut)
    assert err.value.reason == "truncated"


def test_mpo_and_multi_frame_files_decode_their_first_frame(monkeypatch):
    from PIL import GifImagePlugin

    first, second = Image.fromarray(BASE), Image.fromarray(BASE[::-1].copy())
    mpo = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    with Image.open(io.BytesIO(mpo)) as header:
        assert header.format == "MPO" and _check_jpeg(mpo, header) is not None  # the fast path takes it
    assert probe_image(mpo).format == "MPO"
    assert np.abs(decode_image(mpo).astype(int) - BASE).mean() < 4
    first, second = Image.fromarray(BASE), Image.fromarray(BASE[::-1].copy())  # saving as JPEG changed them
    tiff = encode(first, "TIFF", save_all=True, append_images=[second])
    assert (decode_image(tiff) == BASE).all()
    gif = encode(first.convert("L"), "GIF", save_all=True, append_images=[second.convert("L")])
    assert (decode_image(gif)[..., 0] == np.asarray(first.convert("L"))).all()

    seen = []  # an animated GIF of 300 frames of 1000 x 1000: only frame 0 is ever decoded
    seek = GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", lambda self, frame, *a: seen.append(frame) or
                        seek(self, frame, *a))
    assert decode_image(gif_many_frames(300)).shape == (1000, 1000, 3)
    assert set(seen) == {0}


def test_extreme_shapes_decode_to_their_size():
    line = np.arange(65000, dtype=np.uint32).astype(np.uint8)
    assert decode_image(encode(Image.fromarray(line[None, :]), "PNG")).shape == (1, 65000, 3)
    assert decode_image(encode(Image.fromarray(line[:, None].copy()), "GIF")).shape == (65000, 1, 3)
    assert decode_image(encode(Image.fromarray(line[None, :]), "JPEG")).shape == (1, 65000, 3)


def _fuzz_sources() -> dict[str, bytes]:
    small = Image.fromarray(photo("astronaut")[::16, ::16][:24])  # 32 wide x 24 high
    exif = Image.Exif()
    exif[0x0112] = 8
    return {
        "jpeg": encode(small, "JPEG"), "jpeg_gray": encode(small.convert("L"), "JPEG"),
        "jpeg_progressive": encode(small, "JPEG", progressive=True), "jpeg_cmyk": encode(small.convert("CMYK"), "JPEG"),
        "jpeg_rotated": encode(small, "JPEG", exif=exif.tobytes()), "png": encode(small, "PNG"),
        "png_palette": encode(small.convert("P"), "PNG"), "png_rgba": encode(small.convert("RGBA"), "PNG"),
        "webp": encode(small, "WEBP"), "webp_lossless": encode(small, "WEBP", lossless=True),
        "bmp": encode(small, "BMP"), "tiff": encode(small, "TIFF"),
        "tiff_lzw": encode(small, "TIFF", compression="tiff_lzw"),
        "tiff_deflate": encode(small, "TIFF", compression="tiff_adobe_deflate"),
        "gif": encode(small.convert("P"), "GIF"),
    }


def test_fuzzed_files_give_pixels_or_image_rejected():
    """Random byte flips, cuts, insertions and splices of valid files: an RGB array or ImageRejected, never
    another exception."""
    rng = np.random.default_rng(0)
    for name, data in _fuzz_sources().items():
        for trial in range(40):
            buf = bytearray(data)
            op = trial % 4
            if op == 0:  # flip a few bytes, anywhere (the header included)
                for pos in rng.integers(0, len(buf), int(rng.integers(1, 9))):
                    buf[pos] = int(rng.integers(0, 256))
            elif op == 1:  # cut
                buf = buf[: int(rng.integers(1, len(buf)))]
            elif op == 2:  # insert junk
                pos = int(rng.integers(0, len(buf)))
                buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
            else:  # overwrite a run with 0x00 or 0xff (lengths, markers, sizes)
                pos, n = int(rng.integers(0, len(buf))), int(rng.integers(1, 16))
                buf[pos : pos + n] = bytes([int(rng.choice([0, 255]))]) * len(buf[pos : pos + n])
            for call in (decode_image, lambda b: decode_mask(b, 24, 32)):
                try:
                    out = call(bytes(buf))
                except ImageRejected as err:
                    assert err.reason in REASONS, (name, trial, err)
                    continue
                assert out.dtype == np.uint8 and out.ndim in (2, 3), (name, trial)


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
