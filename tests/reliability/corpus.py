"""Hostile inputs, made here from scratch: broken, odd and oversized images and bodies, each with the
status and error code the server documents for it (docs/server.md "Errors", docs/reliability.md).

`CASES` is the corpus; `python -m tests.reliability.corpus` sends every case to an in-process app
with a tiny real bundle and prints the markdown table of docs/reliability.md.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from tests.server.helpers import encode, jpeg, photo

MiB = 1024 * 1024


# -- images -----------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    """A valid 40x48 PNG with one extra ancillary chunk inserted before IEND."""
    good = encode(photo(40, 48), "PNG")
    return good[:-12] + _png_chunk(kind, data) + good[-12:]


def cmyk_jpeg() -> bytes:
    return encode_pil(Image.fromarray(photo(40, 48)).convert("CMYK"), "JPEG", quality=90)


def png16() -> bytes:
    grey = photo(40, 48)[..., 0].astype(np.uint16) * 257  # (40, 48) 16-bit
    img = Image.fromarray(grey)
    assert img.mode == "I;16", img.mode
    return encode_pil(img, "PNG")


def palette_png(transparent: bool = False) -> bytes:
    img = Image.fromarray(photo(40, 48)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode_pil(img, "PNG", **({"transparency": 0} if transparent else {}))


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(photo(40, 48, seed=i)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def exif_rotated(h: int = 40, w: int = 48) -> bytes:
    """A JPEG stored h x w with EXIF orientation 6 (rotate 90 degrees): upright it is w x h."""
    img = Image.fromarray(photo(h, w))
    exif = img.getexif()
    exif[0x0112] = 6
    return encode_pil(img, "JPEG", exif=exif.tobytes(), quality=90)


def huge_exif_jpeg() -> bytes:
    """A JPEG whose EXIF segment is near its 64 KiB maximum (a 60 KB ImageDescription)."""
    img = Image.fromarray(photo(40, 48))
    exif = img.getexif()
    exif[0x010E] = "x" * 60_000
    return encode_pil(img, "JPEG", exif=exif.tobytes(), quality=90)


def encode_pil(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def good_images() -> list[bytes]:
    """A few valid images of every accepted format and mode (also the fuzzer's valid inputs)."""
    return [
        jpeg(40, 48, seed=0),
        jpeg(64, 32, seed=1),
        encode(photo(32, 40, seed=2), "PNG"),
        encode(photo(36, 36, seed=3), "WEBP", quality=80),
        encode(photo(24, 30, seed=4)[..., 0], "PNG"),  # greyscale
        palette_png(),
    ]


# -- requests ---------------------------------------------------------------------------------------
def image_parts(n: int, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    """`n` distinct good JPEGs as multipart `image` parts (httpx `files=`)."""
    return [("image", (f"{i}.jpg", jpeg(seed=seed + i), "image/jpeg")) for i in range(n)]


@dataclass
class Case:
    """One hostile request and its documented answer."""

    name: str
    what: str  # for the table: what was sent
    status: int
    code: str | None  # the envelope's code; None for 2xx
    request: Callable[[], dict[str, Any]]  # httpx request kwargs: method, url, files/content/...
    check: Callable[[dict[str, Any]], None] | None = None  # on a 2xx JSON answer
    notes: str = ""
    tags: list[str] = field(default_factory=list)


def post_images(*images: bytes, ctype: str = "image/jpeg", path: str = "/v1/embed") -> Callable[[], dict]:
    def make() -> dict[str, Any]:
        files = [("image", (f"{i}.jpg", b, ctype)) for i, b in enumerate(images)]
        return {"method": "POST", "url": f"{path}?outputs=cls", "files": files}

    return make


def post_body(
    content: bytes | AsyncIterator[bytes], ctype: str | None, path: str = "/v1/embed"
) -> Callable[[], dict]:
    def make() -> dict[str, Any]:
        headers = {"content-type": ctype} if ctype else {}
        return {"method": "POST", "url": path, "content": content, "headers": headers}

    return make


def post_json(doc: Any = None, raw: bytes | None = None) -> Callable[[], dict]:
    def make() -> dict[str, Any]:
        import orjson

        data = raw if raw is not None else orjson.dumps(doc)
        return {
            "method": "POST",
            "url": "/v1/embed?outputs=cls",
            "content": data,
            "headers": {"content-type": "application/json"},
        }

    return make


def many_parts(n: int, field_name: str = "image") -> Callable[[], dict]:
    def make() -> dict[str, Any]:
        files = [(field_name, (f"{i}.jpg", b"x", "image/jpeg")) for i in range(n)]
        return {"method": "POST", "url": "/v1/embed", "files": files}

    return make


def many_fields(n: int) -> Callable[[], dict]:
    def make() -> dict[str, Any]:
        files = [("image", ("a.jpg", jpeg(), "image/jpeg"))]
        return {
            "method": "POST",
            "url": "/v1/embed",
            "files": files,
            "data": {f"f{i}": "1" for i in range(n)},
        }

    return make


async def chunked(total: int, chunk: int = MiB) -> AsyncIterator[bytes]:
    """A body of `total` bytes sent without Content-Length (chunked transfer)."""
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sent += n
        yield b"\x00" * n


def deep_json(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _original(size: list[int]) -> Callable[[dict[str, Any]], None]:
    def check(answer: dict[str, Any]) -> None:
        assert answer["__metadata__"]["original_sizes"] == [size], answer["__metadata__"]

    return check


def _cls_finite(answer: dict[str, Any]) -> None:
    cls = np.asarray(answer["cls"], dtype=np.float32)
    assert cls.ndim == 2 and np.isfinite(cls).all()


def _cases() -> list[Case]:
    good = jpeg()
    return [
        # -- images the server converts and accepts -------------------------------------------
        Case("jpeg", "a normal 40x48 JPEG (control)", 200, None, post_images(good), _original([40, 48])),
        Case("cmyk", "CMYK JPEG", 200, None, post_images(cmyk_jpeg()), _original([40, 48])),
        Case("png16", "16-bit greyscale PNG", 200, None, post_images(png16()), _original([40, 48])),
        Case("palette", "palette PNG", 200, None, post_images(palette_png()), _original([40, 48])),
        Case(
            "palette_alpha",
            "palette PNG with a transparent index",
            200,
            None,
            post_images(palette_png(transparent=True)),
            _original([40, 48]),
        ),
        Case(
            "webp_anim",
            "animated WebP, 3 frames",
            200,
            None,
            post_images(animated("WEBP")),
            _original([40, 48]),
            "first frame",
        ),
        Case(
            "exif_rotated",
            "JPEG 40x48 stored, EXIF orientation 6",
            200,
            None,
            post_images(exif_rotated()),
            _original([48, 40]),
            "served upright: original size 48x40",
        ),
        Case(
            "huge_exif",
            "JPEG with a 60 KB EXIF ImageDescription",
            200,
            None,
            post_images(huge_exif_jpeg()),
            _cls_finite,
            "metadata ignored",
        ),
        Case(
            "big_text_chunk",
            "PNG with a 2 MB tEXt chunk",
            200,
            None,
            post_images(png_with_chunk(b"tEXt", b"comment\x00" + b"x" * (2 * MiB))),
            _cls_finite,
            "Pillow skips text chunks over 1 MB",
        ),
        Case(
            "wrong_part_type",
            "JPEG part declared `text/plain`",
            200,
            None,
            post_images(good, ctype="text/plain"),
            _cls_finite,
            "format is sniffed; part types ignored",
        ),
        Case(
            "extreme_aspect",
            "PNG 16x4000",
            200,
            None,
            post_images(encode(photo(16, 4000), "PNG")),
            _original([16, 4000]),
        ),
        # -- 400 bad_image -------------------------------------------------------------------
        Case(
            "truncated", "JPEG cut to half its bytes", 400, "bad_image", post_images(good[: len(good) // 2])
        ),
        Case("zero_bytes", "empty part (0 bytes)", 400, "bad_image", post_images(b"")),
        Case("one_pixel", "PNG 1x1", 400, "bad_image", post_images(encode(photo(1, 1), "PNG"))),
        Case(
            "tiny_side",
            "PNG 8x64 (side < min_side 16)",
            400,
            "bad_image",
            post_images(encode(photo(8, 64), "PNG")),
        ),
        Case("not_image", "plain text bytes", 400, "bad_image", post_images(b"hello, this is not an image")),
        Case(
            "random",
            "4 KB of random bytes",
            400,
            "bad_image",
            post_images(np.random.default_rng(0).bytes(4096)),
        ),
        Case("html", "an HTML document", 400, "bad_image", post_images(b"<html><body>hi</body></html>")),
        Case("png_bad_crc", "PNG with a corrupted IDAT", 400, "bad_image", post_images(_corrupt_png())),
        Case(
            "ztxt_bomb",
            "PNG with a zTXt chunk inflating to 64 MB",
            400,
            "bad_image",
            post_images(png_with_chunk(b"zTXt", b"c\x00\x00" + zlib.compress(b"x" * 64 * MiB, 9))),
            notes="Pillow stops inflating text at 1 MB",
        ),
        Case(
            "bad_base64",
            "JSON image `%%%not base64`",
            400,
            "bad_image",
            post_json({"images": ["%%%not base64"]}),
        ),
        Case(
            "b64_not_image",
            "JSON base64 of text",
            400,
            "bad_image",
            post_json({"images": [b64(b"hello world")]}),
        ),
        Case(
            "url_image",
            "JSON image `http://127.0.0.1:9/x.jpg`",
            400,
            "bad_image",
            post_json({"images": ["http://127.0.0.1:9/x.jpg"]}),
            notes="never fetched",
        ),
        Case(
            "one_bad_of_three",
            "3 images, the 2nd truncated",
            400,
            "bad_image",
            post_images(good, good[:300], good),
            notes="message names `image 1`",
        ),
        # -- 413 ---------------------------------------------------------------------------
        Case(
            "png_20000",
            "PNG declaring 20000x20000",
            413,
            "image_too_large",
            post_images(png_declaring(20000, 20000)),
        ),
        Case(
            "png_8000",
            "PNG declaring 8000x6000 (48 MP > max_pixels 40 MP)",
            413,
            "image_too_large",
            post_images(png_declaring(8000, 6000)),
        ),
        Case("many_parts", "5000 tiny file parts", 413, "payload_too_large", many_parts(5000)),
        Case("many_fields", "1 image + 5000 text fields", 413, "payload_too_large", many_fields(5000)),
        Case(
            "too_many_images",
            "65 images (max_images_per_request 64)",
            413,
            "payload_too_large",
            post_images(*([good] * 65)),
        ),
        Case(
            "oversized_body",
            "33 MiB body with Content-Length (max_body_bytes 32 MiB)",
            413,
            "payload_too_large",
            post_images(b"\xff\xd8" + b"\x00" * (33 * MiB)),
        ),
        Case(
            "oversized_chunked",
            "33 MiB chunked body, no Content-Length",
            413,
            "payload_too_large",
            lambda: post_body(chunked(33 * MiB), "multipart/form-data; boundary=x")(),
        ),
        # -- 415 ---------------------------------------------------------------------------
        Case("gif_anim", "animated GIF", 415, "unsupported_media_type", post_images(animated("GIF"))),
        Case("bmp", "BMP image", 415, "unsupported_media_type", post_images(encode(photo(40, 48), "BMP"))),
        Case("tiff", "TIFF image", 415, "unsupported_media_type", post_images(encode(photo(40, 48), "TIFF"))),
        Case(
            "body_text_plain",
            "JPEG bytes as body, `text/plain`",
            415,
            "unsupported_media_type",
            post_body(good, "text/plain"),
        ),
        Case(
            "body_no_type", "body without Content-Type", 415, "unsupported_media_type", post_body(good, None)
        ),
        Case(
            "body_image_jpeg",
            "raw body `image/jpeg`",
            415,
            "unsupported_media_type",
            post_body(good, "image/jpeg"),
        ),
        # -- 422 ---------------------------------------------------------------------------
        Case(
            "deep_json",
            "JSON nested 10 000 arrays deep",
            422,
            "invalid_parameters",
            post_json(raw=deep_json(10_000)),
        ),
        Case(
            "deep_json_20",
            "JSON nested 20 deep (max_json_depth 8)",
            422,
            "invalid_parameters",
            post_json(raw=deep_json(20)),
        ),
        Case("bad_json", "malformed JSON", 422, "invalid_parameters", post_json(raw=b'{"images": [')),
        Case("json_array", "JSON top level an array", 422, "invalid_parameters", post_json([b64(good)])),
        Case(
            "json_number_image",
            "JSON image given as a number",
            422,
            "invalid_parameters",
            post_json({"images": [42]}),
        ),
        Case(
            "json_unknown_option",
            "JSON with an unknown option",
            422,
            "invalid_parameters",
            post_json({"images": [b64(good)], "evil": 1}),
        ),
        Case(
            "multipart_json_type",
            "multipart body labelled application/json",
            422,
            "invalid_parameters",
            lambda: _relabelled("application/json"),
        ),
        Case(
            "bad_boundary",
            "multipart with no boundary",
            422,
            "invalid_parameters",
            post_body(b"--x\r\n\r\n", "multipart/form-data"),
        ),
        Case("wrong_field", "file part named `photo`", 422, "invalid_parameters", _wrong_field),
        Case(
            "no_images",
            "multipart with no parts",
            422,
            "invalid_parameters",
            post_body(b"--x--\r\n", "multipart/form-data; boundary=x"),
        ),
    ]


def _corrupt_png() -> bytes:
    data = bytearray(encode(photo(40, 48), "PNG"))
    i = data.index(b"IDAT") + 20
    data[i : i + 16] = b"\xff" * 16
    return bytes(data)


def _relabelled(ctype: str) -> dict[str, Any]:
    import httpx

    req = httpx.Request("POST", "http://x/v1/embed", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))])
    return {"method": "POST", "url": "/v1/embed", "content": req.read(), "headers": {"content-type": ctype}}


def _wrong_field() -> dict[str, Any]:
    return {"method": "POST", "url": "/v1/embed", "files": [("photo", ("a.jpg", jpeg(), "image/jpeg"))]}


CASES = _cases()


def table(rows: list[tuple[Case, int, str | None, str]]) -> str:
    """Markdown: input | documented | seen | code | notes."""
    out = ["| input | expected | seen | error code | message (or note) |", "|---|---|---|---|---|"]
    for case, status, code, message in rows:
        note = message if code else case.notes
        out.append(f"| {case.what} | {case.status} | {status} | {code or '-'} | {note[:90]} |")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover (prints the table for docs/reliability.md)
    import asyncio
    import sys
    import tempfile
    from pathlib import Path

    from tests.server.helpers import make_tiny_bundle, running, settings_for

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = make_tiny_bundle(Path(tmp) / "tiny")
            rows = []
            async with running(settings_for(bundle)) as (_, client):
                for case in CASES:
                    r = await client.request(**case.request())
                    code = r.json()["error"]["code"] if r.status_code >= 400 else None
                    msg = r.json()["error"]["message"] if code else ""
                    rows.append((case, r.status_code, code, msg))
            print(table(rows))
            bad = [c.name for c, s, code, _ in rows if s != c.status or code != c.code]
            print(f"\n{len(rows)} inputs, {len(bad)} not as documented: {bad}", file=sys.stderr)

    asyncio.run(main())
