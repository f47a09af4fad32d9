from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cotap.core.images import (
    MAX_DECODABLE_PIXELS,
    DecodeLimits,
    ImageDecodeError,
    clean_message,
    decode_image,
    load_pixels,
    to_rgb,
)
from cotap.core.preprocess import PreprocessConfig
from cotap.core.wire import ErrorCode


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats(fmt: str) -> None:
    img, size = decode_image(_encode(_rgb(), fmt))
    assert img.mode == "RGB" and img.size == (64, 48) and size == (48, 64)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = _encode(_rgb(64, 48), "JPEG", exif=exif.tobytes())
    img, size = decode_image(data)
    assert img.size == (48, 64) and size == (64, 48)


def test_draft_mode_keeps_target_covered() -> None:
    data = _encode(_rgb(1024, 768), "JPEG", quality=90)
    cfg = PreprocessConfig(size=(224, 224), patch_size=16)
    img, size = decode_image(data, target=cfg)
    assert size == (768, 1024)
    assert img.size[0] >= 224 and img.size[1] >= 224 and img.size[0] < 1024  # decoded at a reduced DCT scale
    x, orig = load_pixels(data, cfg)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and orig == (768, 1024)


def _smooth(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 37) * np.cos(y / 23)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize(
    ("w", "h", "orientation"), [(1399, 2755, 1), (2755, 1399, 1), (1399, 2755, 6), (3000, 2001, 8)]
)
def test_draft_mode_keeps_the_policy_grid(w: int, h: int, orientation: int) -> None:
    # the shorter-side policy applies to the file's size, not to the smaller draft-decoded image:
    # a JPEG and a PNG of one picture get one grid, and nearly the same pixels
    cfg = PreprocessConfig(resize="shorter_side", size=224, patch_size=14, max_side=1024)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = _smooth(w, h)
    jpeg, orig = load_pixels(_encode(image, "JPEG", quality=95, exif=exif.tobytes()), cfg)
    upright = (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    assert orig == upright
    assert decode_image(_encode(image, "JPEG", exif=exif.tobytes()), target=cfg)[0].height < upright[0]
    assert jpeg.shape[1:] == cfg.output_size(*upright)
    png, _ = load_pixels(_encode(image, "PNG", exif=exif.tobytes()), cfg)
    assert png.shape == jpeg.shape
    assert float(np.abs(png - jpeg).mean()) < 0.05  # normalised units: about 3/255 per std


@pytest.mark.parametrize(
    "mode",
    ["L", "RGBA", "P", "CMYK", "I;16", "LA"],
)
def test_mode_conversion(mode: str) -> None:
    base = _rgb()
    if mode == "I;16":
        img = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
        fmt = "PNG"
    elif mode == "CMYK":
        img, fmt = base.convert("CMYK"), "JPEG"
    else:
        img, fmt = base.convert(mode), "PNG"
    out, _ = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", ErrorCode.BAD_IMAGE),
        (b"not an image at all", ErrorCode.BAD_IMAGE),
        (_png_header_only(20000, 20000), ErrorCode.IMAGE_TOO_LARGE),
        (_png_header_only(1, 1), ErrorCode.BAD_IMAGE),
    ],
)
def test_guards(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, DecodeLimits(max_pixels=40_000_000, min_side=16))
    assert e.value.code == code


def test_max_pixels_decides_up_to_pillows_hard_limit() -> None:
    # 95 MP is over Pillow's warning threshold (89 MP): max_pixels decides, not Pillow
    header = _png_header_only(10_000, 9_500)
    with pytest.raises(ImageDecodeError, match="the limit is 90000000") as e:
        decode_image(header, DecodeLimits(max_pixels=90_000_000))
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE
    with pytest.raises(ImageDecodeError) as e:
        decode_image(header, DecodeLimits(max_pixels=100_000_000))
    assert e.value.code == ErrorCode.BAD_IMAGE  # admitted by the guard; its pixel data is truncated
    with pytest.raises(ValueError, match="Pillow refuses larger images"):
        DecodeLimits(max_pixels=MAX_DECODABLE_PIXELS + 1)


def test_truncated_jpeg_is_bad_image() -> None:
    data = _encode(_rgb(256, 256), "JPEG")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.code == ErrorCode.BAD_IMAGE


def test_gif_is_unsupported() -> None:
    with pytest.raises(ImageDecodeError) as e:
        decode_image(_encode(_rgb(), "GIF"))
    assert e.value.code == ErrorCode.UNSUPPORTED_MEDIA_TYPE


def test_byte_limit() -> None:
    with pytest.raises(ImageDecodeError) as e:
        decode_image(_encode(_rgb(), "PNG"), DecodeLimits(max_bytes=100))
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE


def _jpeg_declaring(w: int, h: int) -> bytes:
    """A small JPEG whose frame header claims w x h."""
    data = bytearray(_encode(_rgb(16, 16), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (_png_header_only(50_000, 50_000), "50000x50000 = 2500000000"),
        (_jpeg_declaring(60_000, 30_000), "60000x30000 = 1800000000"),
    ],
)
def test_over_pillows_hard_limit_names_our_limit(data: bytes, size: str) -> None:
    # past 2 x Pillow's MAX_IMAGE_PIXELS, Pillow refuses to open the image at all; the message is
    # still ours, with the declared size and the configured max_pixels
    assert int(size.split(" = ")[1]) > MAX_DECODABLE_PIXELS
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, DecodeLimits(max_pixels=12_345_678))
    assert e.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert str(e.value) == f"image declares {size} pixels; the limit is 12345678"
    assert "bomb" not in str(e.value)


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """The plain reference: a over white, per channel, in floats."""
    a = rgba[..., 3:].astype(np.float64) / 255
    return rgba[..., :3].astype(np.float64) * a + 255 * (1 - a)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_to_rgb_composites_transparency_over_white(mode: str) -> None:
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    if mode == "RGBA":
        image = Image.fromarray(rgba, "RGBA")
    elif mode == "LA":
        image = Image.fromarray(rgba, "RGBA").convert("LA")
        la = np.asarray(image)
        rgba = np.dstack([la[..., 0]] * 3 + [la[..., 1]])
    else:  # a palette image with one transparent colour, as GIFs and small PNGs have
        rgba[..., 3] = 255
        rgba[:6, :, :3] = (10, 200, 30)
        image = Image.fromarray(rgba[..., :3], "RGB").quantize(8)
        index = image.getpixel((0, 0))
        image.info["transparency"] = index
        rgba = np.asarray(image.convert("RGBA"))
        assert (rgba[:6, :, 3] == 0).all()
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(np.float64) - _composite_over_white(rgba)).max() <= 1.0


def test_clean_message_drops_object_reprs() -> None:
    try:
        Image.open(io.BytesIO(b"not an image"))
    except Exception as e:
        assert "object at 0x" in str(e)
        assert clean_message(e) == "cannot identify image file"
