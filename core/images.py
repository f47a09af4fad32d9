"""Safe image decoding: format allow-list, decompression-bomb and minimum-size guards, EXIF
orientation, mode conversion, and JPEG draft mode (DCT-domain downscaling) when the target is small.

Every failure is an `ImageDecodeError` carrying the wire error code, so that callers map it to a
4xx without guessing.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from cotap.core.preprocess import PreprocessConfig, normalize, resize_image
from cotap.core.wire import ErrorCode

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # the file names of those formats, for folder scans
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageDecodeError(ValueError):
    """An image that cannot be used, with the error code the server answers with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_IMAGE) -> None:
        super().__init__(message)
        self.code = code


# Pillow refuses images over twice its MAX_IMAGE_PIXELS outright (DecompressionBombError); below
# that, `max_pixels` is the guard (Pillow's own warning, at 89 MP by default, is ignored).
MAX_DECODABLE_PIXELS = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


@dataclass(frozen=True)
class DecodeLimits:
    """Guards applied before any pixel is decoded (the declared size is read from the header)."""

    max_pixels: int = 40_000_000
    min_side: int = 16
    max_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_pixels <= MAX_DECODABLE_PIXELS:
            raise ValueError(
                f"max_pixels must be between 1 and {MAX_DECODABLE_PIXELS} (Pillow refuses larger images)"
            )


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def clean_message(error: Exception) -> str:
    """An exception's message without object reprs (`<_io.BytesIO object at 0x...>`), for users."""
    return _OBJECT_REPR.sub("", str(error)) or type(error).__name__


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) an accepted format declares in its header, read by the format's own
    plugin (which, unlike `Image.open`, applies no decompression-bomb check); None if unknown."""
    Image.init()
    for fmt in sorted(ALLOWED_FORMATS):
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(data[:16]):
                continue
            with factory(io.BytesIO(data), "") as image:
                return image.size
        except Exception:
            continue
    return None


def _too_many_pixels(limits: DecodeLimits, size: tuple[int, int] | None) -> ImageDecodeError:
    if size is None:
        return ImageDecodeError(
            f"image declares more pixels than can be decoded safely; the limit is {limits.max_pixels}",
            ErrorCode.IMAGE_TOO_LARGE,
        )
    w, h = size
    return ImageDecodeError(
        f"image declares {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}",
        ErrorCode.IMAGE_TOO_LARGE,
    )


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty image (zero bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(
            f"image is {len(data)} bytes; the limit is {limits.max_bytes}", ErrorCode.IMAGE_TOO_LARGE
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over Pillow's hard limit: say it with ours
        raise _too_many_pixels(limits, _declared_size(data)) from e
    except Image.UnidentifiedImageError as e:  # its message holds the BytesIO repr: not for clients
        raise ImageDecodeError("not a decodable image: cannot identify image file") from e
    except Exception as e:  # SyntaxError, struct errors from broken headers
        raise ImageDecodeError(f"not a decodable image: {clean_message(e)}") from e
    if image.format not in ALLOWED_FORMATS:
        raise ImageDecodeError(
            f"image format {image.format} is not accepted; send JPEG, PNG or WebP",
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    w, h = image.size
    if w * h > limits.max_pixels:
        raise _too_many_pixels(limits, (w, h))
    if min(w, h) < limits.min_side:
        raise ImageDecodeError(
            f"image is {w}x{h}; the shorter side must be at least {limits.min_side} pixels"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB: transparency (RGBA, LA, PA, a palette with a transparent colour) composited
    over white, 16-bit and float greys scaled to 0..255, any other mode converted. The one rule
    for both the server's decoding and the SDK's encoding of in-memory images."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        a = np.clip(a * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes, limits: DecodeLimits = DecodeLimits(), target: PreprocessConfig | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (an upright RGB PIL image, the upright (height, width) the file declares).

    With `target`, JPEGs decode in draft mode at the smallest DCT scale that still covers the
    target size (about 2x faster for large photos), so the image may be smaller than declared."""
    image = _open(data, limits)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP: the first frame
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        w, h = image.size
        uh, uw = (w, h) if orientation in _TRANSPOSED_ORIENTATIONS else (h, w)
        if target is not None and image.format == "JPEG":
            oh, ow = target.output_size(uh, uw)
            req = (oh, ow) if orientation in _TRANSPOSED_ORIENTATIONS else (ow, oh)
            image.draft("RGB", req)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image), (uh, uw)
    except ImageDecodeError:
        raise
    except Exception as e:  # truncated data, corrupt chunks, bad palettes
        raise ImageDecodeError(f"image could not be decoded: {clean_message(e)}") from e


def load_pixels(
    data: bytes, config: PreprocessConfig, limits: DecodeLimits = DecodeLimits()
) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> (normalised float32 (3, H, W) model input, (height, width) of the upright original)."""
    image, original = decode_image(data, limits, target=config)
    resized = resize_image(image, config, original)
    return normalize(np.asarray(resized), config), original
