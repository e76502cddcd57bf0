"""Decoding and validating images and masks from encoded bytes.

``decode_image`` is the only way bytes become pixels in this project (prepare, training, inference):
it validates the header and the pixels, rejects decompression bombs from the header before any pixel is
decoded, applies the EXIF orientation and converts every mode to RGB uint8:

- grayscale (L, 1, I;16, I) -> replicated to 3 channels; 16-bit and 32-bit integer samples are scaled
  down (``round(v / 257)``), not clipped;
- CMYK (including Adobe's inverted CMYK JPEGs, which PIL un-inverts while decoding) -> PIL's conversion;
- palette (P, PA), with or without transparency -> expanded through the palette;
- anything with alpha (RGBA, LA, PA, palette transparency): the alpha channel is DROPPED and the stored
  colours kept as they are (no compositing onto a background), so no colour data is invented.

Failures raise ``ImageRejected`` with a short ``reason`` code (see REASONS). ``encode_png`` is the one way
pixels become bytes again (inference outputs, evaluation grids).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_PIXELS

# File name endings (lower case) that the jobs treat as images when they list a folder of inputs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

REASONS = (
    "empty",  # zero bytes
    "not_an_image",  # no known image header
    "truncated",  # the file ends before the pixel data does
    "corrupt",  # the header or pixel stream is damaged
    "decompression_bomb",  # the header claims more than max_pixels pixels
    "too_small",  # shorter side below min_size
    "unsupported_mode",  # a pixel format we do not convert
    "mask_size_mismatch",  # decode_mask: the mask is not the size of its image
    "empty_mask",  # decode_mask: zero bytes
)


class ImageRejected(ValueError):
    """Bytes that are not a usable image. ``reason`` is a short code from ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ImageInfo:
    """What ``probe_image`` learns: the displayed size (after EXIF orientation) and the container format."""

    height: int
    width: int
    format: str  # PIL's format name: "JPEG", "PNG", "WEBP", ...


def _open_header(data: bytes, max_pixels: int, min_size: int) -> Image.Image:
    """Open lazily (header only) and check it: size, decompression bomb, minimum size; raise ImageRejected."""
    if not data:
        raise ImageRejected("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageRejected("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "no known image header") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected("corrupt", f"bad header: {err}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"header gives size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} is over {max_pixels} pixels")
    if min(width, height) < min_size:
        raise ImageRejected("too_small", f"{width}x{height} is below {min_size} px on its short side")
    return img


def _open_validated(data: bytes, max_pixels: int, min_size: int) -> Image.Image:
    """Open, check the header, decode every pixel and apply EXIF orientation; raise ImageRejected."""
    return _load_validated(_open_header(data, max_pixels, min_size))


def _load_validated(img: Image.Image) -> Image.Image:
    """Decode every pixel of an image ``_open_header`` checked and apply EXIF orientation; raise ImageRejected."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned truncation tolerance on globally: we still want it off
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; decode_image needs it False")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Image.DecompressionBombError as err:
        raise ImageRejected("decompression_bomb", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        text = str(err)
        if "truncated" in text.lower() or isinstance(err, EOFError):
            raise ImageRejected("truncated", text) from None
        raise ImageRejected("corrupt", text) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a malformed EXIF block: keep the pixels as stored
        raise ImageRejected("corrupt", f"bad EXIF: {err}") from None
    return img


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB, alpha dropped, high bit depths scaled down."""
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        v = np.asarray(img).astype(np.float64)
        if mode == "I" and v.max(initial=0) > 65535:  # genuinely 32-bit samples: scale by the 32-bit range
            v = v / (2**32 - 1) * 65535.0
        gray = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, 257 -> 1
        arr = np.repeat(gray[..., None], 3, axis=-1)
    elif mode == "F":
        v = np.asarray(img).astype(np.float64)
        scale = 255.0 if v.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(v * scale), 0, 255).astype(np.uint8)
        arr = np.repeat(gray[..., None], 3, axis=-1)
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))[..., :3]
    elif mode in ("RGBA", "RGBa", "RGBX", "LA", "La", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"))
    else:
        try:
            arr = np.asarray(img.convert("RGB"))
        except (ValueError, OSError) as err:
            raise ImageRejected("unsupported_mode", f"mode {mode}: {err}") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageRejected("unsupported_mode", f"mode {mode} gave {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied (H, W are the displayed size).

    Raises ImageRejected("empty" | "not_an_image" | "truncated" | "corrupt" | "decompression_bomb" |
    "too_small" | "unsupported_mode"). Headers claiming more than ``max_pixels`` pixels are rejected
    before any pixel is decoded; ``min_size`` is the least allowed short side.
    """
    header = _open_header(data, max_pixels, min_size)
    arr = _decode_plain_jpeg(data, header)
    return arr if arr is not None else _to_rgb(_load_validated(header))


_EXIF_ORIENTATION = 0x0112


def _decode_plain_jpeg(data: bytes, header: Image.Image) -> np.ndarray | None:
    """The fast path for the common case, a complete RGB or grayscale JPEG with no EXIF rotation: OpenCV
    decodes it straight into an array (the same libjpeg-turbo pixels as PIL, without PIL's two copies; the
    README's benchmark table has the figures, a test checks the two paths agree). None for anything else, which takes the PIL path.

    A file must end with the JPEG end-of-image marker to come here, so a truncated one is left to PIL,
    which rejects it (OpenCV would fill the missing rows with grey).
    """
    if header.format != "JPEG" or header.mode not in ("RGB", "L") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        if header.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return None
    except Exception:  # noqa: BLE001 - a malformed EXIF block: PIL's path reports it
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    width, height = header.size
    if arr is None or arr.shape != (height, width, 3) or arr.dtype != np.uint8:
        return None
    return arr


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> ImageInfo:
    """Fully validate ``data`` (as ``decode_image`` does, pixels included) and return its size and format."""
    if not data:
        raise ImageRejected("empty", "zero bytes")
    fmt = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fmt = Image.open(io.BytesIO(data)).format
    except Exception:
        pass  # _open_validated below raises the precise reason
    arr = decode_image(data, max_pixels=max_pixels, min_size=min_size)
    return ImageInfo(height=int(arr.shape[0]), width=int(arr.shape[1]), format=str(fmt or "UNKNOWN"))


def decode_mask(data: bytes, height: int, width: int) -> np.ndarray:
    """Encoded mask bytes -> (H, W) uint8 in {0, 1}, 1 = hole (white), 0 = known (black).

    Grayscale, RGB (luminance), RGBA/LA (luminance times alpha, so white strokes on a transparent
    background are holes), palette and 16-bit masks are accepted; a pixel is a hole when its value is at
    least half of full scale (>= 128 of 255). A mask with no hole pixels is returned as all zeros.
    Raises ImageRejected("empty_mask") for zero bytes, ("mask_size_mismatch") when the decoded mask is not
    ``height x width``, or any decode_image reason.
    """
    if not data:
        raise ImageRejected("empty_mask", "zero bytes")
    img = _open_validated(data, DEFAULT_MAX_PIXELS, 0)
    if img.size != (width, height):
        raise ImageRejected("mask_size_mismatch", f"mask is {img.size[0]}x{img.size[1]}, image is {width}x{height}")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _to_rgb(img)[..., 0].astype(np.float32)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
        lum = np.asarray(Image.fromarray(rgba[..., :3].astype(np.uint8)).convert("L")).astype(np.float32)
        gray = lum * rgba[..., 3] / 255.0
    else:
        gray = np.asarray(img.convert("L")).astype(np.float32)
    return (gray >= 127.5).astype(np.uint8)


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes through OpenCV (lossless; ``compression`` 0-9, 1 is fast).

    Raises ValueError for any other shape or dtype, an empty image or a compression outside 0-9, and
    ValueError("PNG encoding failed") if OpenCV fails. ``decode_image`` of the result gives back ``image``
    exactly.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"encode_png wants a uint8 (H, W, 3) RGB array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"encode_png got an empty image {arr.shape}")
    if not 0 <= int(compression) <= 9:
        raise ValueError(f"PNG compression must be 0-9, got {compression}")
    try:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr[..., ::-1]),
                               [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    except cv2.error as err:
        raise ValueError("PNG encoding failed") from err
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
