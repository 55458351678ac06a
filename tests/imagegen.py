"""Images for the image-input tests: valid small ones, damaged ones, and decompression bombs.

The bombs are built from their format specifications (PNG chunks with real CRCs, GIF blocks,
WebP RIFF chunks), never by asking Pillow to encode a huge image, so building one costs the
test almost nothing: :func:`png_bomb` is a real, fully decodable PNG whose IDAT is produced
by streaming rows through zlib, and the others are headers that claim huge sizes.
"""

from __future__ import annotations

import base64
import functools
import io
import struct
import zlib
from typing import Any


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- valid small images (Pillow encodes them) ------------------------------------------------


def encoded(fmt: str, size: tuple[int, int] = (8, 6), color: Any = (200, 30, 60), **save: Any
            ) -> bytes:
    """A small single-colour image in ``fmt`` (PNG, JPEG, WEBP, GIF, BMP, TIFF)."""
    from PIL import Image

    mode = "P" if fmt == "GIF" else "RGB"
    image = Image.new("RGB", size, color)
    if mode == "P":
        image = image.quantize(2)
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


# -- PNG -------------------------------------------------------------------------------------


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_ihdr(width: int, height: int, color_type: int = 0) -> bytes:
    """The IHDR chunk of an 8-bit, non-interlaced image (colour type 0 gray, 2 RGB)."""
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` gray pixels, with one row of data."""
    idat = zlib.compress(b"\x00" + b"\x00" * min(width, 1024))
    return PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IDAT", idat) + png_chunk(
        b"IEND", b"")


def png_gray(width: int, height: int, value: int = 0x7F) -> bytes:
    """A complete, valid gray PNG of one value, compressed row by row (never all in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    row = b"\x00" + bytes([value]) * width  # filter type 0, then the pixels
    rows_per_call = max(1, (1 << 20) // len(row))
    parts: list[bytes] = []
    done = 0
    while done < height:
        n = min(rows_per_call, height - done)
        parts.append(compressor.compress(row * n))
        done += n
    parts.append(compressor.flush())
    return (PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))


@functools.cache
def png_bomb() -> bytes:
    """20000 x 20000 gray pixels (400 MB decoded, more as Pillow holds it) in about 400 KiB."""
    return png_gray(20000, 20000)


# -- JPEG ------------------------------------------------------------------------------------


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is rewritten to claim ``width`` x ``height``."""
    data = bytearray(encoded("JPEG", (8, 8)))
    sof = data.index(b"\xff\xc0")
    # marker (2), length (2), precision (1), then height and width, big-endian
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# -- GIF -------------------------------------------------------------------------------------


def gif(screen: tuple[int, int], frame: tuple[int, int], *, disposal: int = 0) -> bytes:
    """A GIF89a with a 2-colour table, one graphic control extension (``disposal``) and one
    ``frame``-sized frame at the origin, whose data is a tiny LZW stream."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    control = b"\x21\xf9\x04" + bytes([disposal << 2]) + b"\x00\x00\x00\x00"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
    data = b"\x02\x02\x44\x01\x00"  # LZW min code size 2, one sub-block, terminator
    return header + control + descriptor + data + b"\x3b"


# -- WebP ------------------------------------------------------------------------------------


def _riff(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l_claiming(width: int, height: int) -> bytes:
    """A lossless WebP header claiming ``width`` x ``height`` (each at most 16384)."""
    bits = (width - 1) | ((height - 1) << 14) | (1 << 28)  # alpha hint, version 0
    return _riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8)


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    """An extended WebP header whose canvas claims ``width`` x ``height`` (at most 2**24)."""
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return _riff(b"VP8X", b"\x00\x00\x00\x00" + canvas)
