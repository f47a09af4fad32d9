"""What the SDK accepts as an image, and how each becomes the bytes of one multipart part.

Accepted: a path (str or PathLike), encoded bytes, a PIL image, or a NumPy uint8 array (H, W),
(H, W, 1), (H, W, 3) or (H, W, 4). JPEG, PNG and WebP files go over the wire untouched (the server
decodes them exactly as it would any upload); other formats Pillow reads (BMP, TIFF, GIF, ...)
and in-memory pixels are encoded losslessly as PNG by default.

Everything that is re-encoded here follows the server's own decoding rules first, so that a file
and the same picture in memory look alike to the model: EXIF orientation applied (upright), and
transparency composited over white (`cotap.core.images.to_rgb`, the server's rule).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, Union

import numpy as np
from PIL import Image, ImageOps

from cotap.client.errors import BadImage
from cotap.core.images import clean_message, to_rgb

ImageInput: TypeAlias = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]
EncodeFormat = Literal["PNG", "JPEG", "WEBP"]

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_ALIASES = {"JPG": "JPEG"}
_ORIENTATION = 0x0112


def encode_format(value: object) -> EncodeFormat:
    """`value` as one of 'PNG', 'JPEG', 'WEBP' (any case; 'jpg' is JPEG); ValueError otherwise."""
    name = value.upper() if isinstance(value, str) else None
    name = _ALIASES.get(name, name) if name is not None else None
    if name not in MEDIA_TYPES:
        raise ValueError(
            f"image_format must be one of PNG, JPEG, WEBP (any case), got {value!r}: it is "
            "how in-memory images are encoded, and the server accepts only these"
        )
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class EncodedImage:
    """One image ready to send: its bytes, a file name for the part, and its media type."""

    data: bytes
    name: str
    media_type: str

    def __len__(self) -> int:
        return len(self.data)


def sniff(data: bytes | memoryview) -> str | None:
    """'JPEG', 'PNG' or 'WEBP' from the magic bytes; None for anything else."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def upright_rgb(image: Image.Image) -> Image.Image:
    """`image` as the server would see it if it came as a file: EXIF orientation applied, then RGB
    with transparency over white (greyscale stays L: the server turns it into the same RGB)."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image) or image
    return image if image.mode in ("RGB", "L") else to_rgb(image)


def _encode_pil(image: Image.Image, fmt: EncodeFormat, name: str) -> EncodedImage:
    image = upright_rgb(image)
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, "PNG", compress_level=1)  # fast; size matters less than time here
    elif fmt == "JPEG":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "WEBP", lossless=True)
    return EncodedImage(buf.getvalue(), f"{name}.{_SUFFIX[fmt]}", MEDIA_TYPES[fmt])


def array_to_image(array: np.ndarray) -> Image.Image:
    """A uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as a PIL image."""
    if array.dtype != np.uint8:
        raise TypeError(
            f"image arrays must be uint8 (H, W, 3) with values 0..255, got {array.dtype}; "
            "convert first, e.g. (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(
        f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) in HWC order, got shape "
        f"{array.shape} (a CHW array? use x.transpose(1, 2, 0))"
    )


def encode_bytes(data: bytes, name: str, fmt: EncodeFormat = "PNG") -> EncodedImage:
    """Encoded bytes: JPEG/PNG/WebP as they are, anything else Pillow reads re-encoded as `fmt`."""
    kind = sniff(data)
    if kind is not None:
        return EncodedImage(data, name, MEDIA_TYPES[kind])
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _encode_pil(image, fmt, Path(name).stem or "image")
    except Exception as e:  # not an image at all, or a broken one
        raise BadImage(f"not a readable image ({clean_message(e)})") from e


def encode_image(image: ImageInput, fmt: EncodeFormat = "PNG", name: str = "image") -> EncodedImage:
    """Any accepted input as the bytes of one multipart part."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file {str(path)!r}")
        try:
            return encode_bytes(path.read_bytes(), path.name, fmt)
        except BadImage as e:
            raise BadImage(f"{path}: {e.message}") from e
    if isinstance(image, bytes | bytearray | memoryview):
        return encode_bytes(bytes(image), name, fmt)
    if isinstance(image, Image.Image):
        return _encode_pil(image, fmt, name)
    if isinstance(image, np.ndarray):
        return _encode_pil(array_to_image(image), fmt, name)
    raise TypeError(
        f"cannot send {type(image).__name__} as an image: pass a path, bytes, a PIL image or a "
        "uint8 (H, W, 3) NumPy array"
    )


def is_single(images: Any) -> bool:
    """True for one image, False for a sequence of them (a list, a tuple, a 4-D array)."""
    if isinstance(images, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim <= 3
    return False


def as_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """(the images as a list, whether one image was given)."""
    if is_single(images):
        return [images], True  # type: ignore[list-item]
    if isinstance(images, np.ndarray):
        return list(images), False
    if isinstance(images, Mapping | Set):  # its keys, or no order: results could not be matched up
        raise TypeError(
            f"expected an image or a sequence of images, got a {type(images).__name__}; pass a list "
            "(for a dict of images: list(d.values()), in the order of list(d))"
        )
    if isinstance(images, Sequence):
        return list(images), False  # type: ignore[arg-type]
    try:
        return list(images), False  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"expected an image or a sequence of images, got {type(images).__name__}") from None


def image_size(encoded: EncodedImage) -> tuple[int, int] | None:
    """(height, width) the image declares, read from its header without decoding; None if unknown."""
    try:
        with Image.open(io.BytesIO(encoded.data)) as image:
            w, h = image.size
            orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def to_pil(image: ImageInput) -> Image.Image:
    """Any accepted input as an upright RGB PIL image (EXIF orientation applied, as the server
    does), for drawing."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        pil = array_to_image(image)
    elif isinstance(image, str | os.PathLike):
        pil = Image.open(Path(image))
    elif isinstance(image, bytes | bytearray | memoryview):
        pil = Image.open(io.BytesIO(bytes(image)))
    else:
        raise TypeError(f"cannot draw {type(image).__name__}: pass a path, bytes, a PIL image or an array")
    return upright_rgb(pil).convert("RGB")
