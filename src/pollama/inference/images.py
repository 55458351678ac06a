"""Request images: the one place where image input is decoded, and only within limits.

Every image a request carries (``/api/generate`` ``images``, ``/api/chat``
``messages[].images``, OpenAI ``image_url`` data URLs, Anthropic base64 image blocks) goes
through :func:`validate_images`, called once by ``InferenceService.prepare`` before any
capability check, whatever the protocol. Decoding untrusted images is where image-handling
servers fall over (Ollama's CVE-2026-46603 in ``golang.org/x/image``; decompression bombs: a
few hundred KiB of PNG that inflate to gigabytes). The order of the checks is the point and
must stay as it is; each one is cheap next to the one after it:

1. the number of images (``POLLAMA_MAX_IMAGES``);
2. the size, computed from the base64 length before anything is decoded
   (``POLLAMA_MAX_IMAGE_BYTES``, counted in decoded bytes);
3. strict base64: the standard alphabet with padding; ``\\r`` and ``\\n`` are skipped, as
   Go's decoder (Ollama's) skips them;
4. the format, from its magic bytes: PNG, JPEG, WebP or GIF and nothing else;
5. the dimensions the header claims, against ``POLLAMA_MAX_IMAGE_PIXELS``: our own parse of
   the PNG, GIF (screen and first frame, because Pillow fills a frame-sized buffer while it
   opens a GIF) and WebP headers (libwebp allocates the whole canvas when it opens a file),
   then Pillow's parsed size again for every format (the only check JPEG needs: its header
   parse allocates nothing);
6. only then the full decode of the first frame (``load()``), so damaged or truncated data
   is a 400 now rather than a failure in a model later.

Pillow is imported lazily, by the first request that carries an image: the server's resident
memory does not pay for it otherwise. Images are opened through the format's own
``ImageFile`` class rather than ``Image.open``, so that Pillow's process-wide
``MAX_IMAGE_PIXELS`` (a module global shared by everything in the process) does not decide:
our per-server limit does, and this module never writes any Pillow global. Pillow's own
checks still run where its plugins make them (GIF frame extents, the WebP canvas); one that
fires becomes our error too. Only the first frame of an animated GIF, WebP or PNG is decoded:
it is the still image a vision model is given.

Audio rides in the same fields (Ollama's choice), so :func:`validate_images` checks every
*medium*: one whose first bytes are audio (llama.cpp's own test, :func:`~pollama.inference.
audio.is_audio`) goes through steps 2 and 3 with the audio byte cap
(``POLLAMA_MAX_AUDIO_BYTES``), then through ``inference.audio`` instead of steps 4 to 6.
Images and audio clips are numbered separately in messages ("image 2", "audio 1"); the
count of step 1 is of both together.

Everything here is synchronous and CPU-bound (a 50-megapixel decode takes about half a
second); the service runs :func:`validate_images` off the event loop.
"""

from __future__ import annotations

import binascii
import io
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pollama.errors import InvalidAudio, InvalidImage
from pollama.inference.audio import (
    AudioBudget,
    ValidatedAudio,
    head_bytes,
    is_audio,
    validate_audio,
)

if TYPE_CHECKING:
    from PIL.ImageFile import ImageFile

    from pollama.config import Settings
    from pollama.inference.types import InferenceRequest

__all__ = [
    "MEDIA_TYPES",
    "SUPPORTED_FORMATS",
    "URL_REFUSED",
    "ImageLimits",
    "ValidatedImage",
    "ValidatedMedium",
    "check_count",
    "check_media_type",
    "decode_base64",
    "image_from_data_url",
    "request_images",
    "validate_image",
    "validate_images",
]

SUPPORTED_FORMATS = "PNG, JPEG, WebP or GIF"
"""The formats a request image may have, as error messages name them."""

MEDIA_TYPES: dict[str, str] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",  # not registered, but Ollama accepts it and clients send it
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
"""Media types accepted in data: URLs and Anthropic base64 sources (no type is accepted too:
the bytes decide, as for the native API)."""

URL_REFUSED = "image URLs are not currently supported, please use base64 encoded data instead"
"""Ollama's message for an http(s) image URL (openai/openai.go); pollama never fetches one."""

_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF"}

# Magic bytes of formats people send by mistake, to say what the image is instead.
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"<svg", "an SVG image"),
    (b"<?xml", "an XML (SVG?) document"),
    (b"\x00\x00\x01\x00", "an ICO image"),
)


@dataclass(frozen=True)
class ImageLimits:
    """The caps every request medium is checked against (see :class:`pollama.config.Settings`:
    ``POLLAMA_MAX_IMAGES``, ``POLLAMA_MAX_IMAGE_BYTES``, ``POLLAMA_MAX_IMAGE_PIXELS``,
    ``POLLAMA_MAX_AUDIO_BYTES``, ``POLLAMA_MAX_AUDIO_SECONDS``)."""

    max_images: int
    max_bytes: int
    max_pixels: int
    max_audio_bytes: int = 25 << 20
    max_audio_seconds: float = 600

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            settings.max_images,
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.max_audio_bytes,
            settings.max_audio_seconds,
        )


@dataclass(frozen=True)
class ValidatedImage:
    """An image that decoded completely within the limits.

    ``data`` is the file exactly as sent (base64-decoded); ``format`` is ``PNG``, ``JPEG``,
    ``WEBP`` or ``GIF``; ``index`` is its 1-based position among the request's images.
    Holding the file rather than the pixels keeps a request's memory at its compressed size;
    :meth:`decode` gives the pixels when a vision model needs them.
    """

    index: int
    format: str
    width: int
    height: int
    data: bytes = field(repr=False)  # megabytes: never in a log line or a test failure

    def decode(self) -> Any:
        """The first frame as a loaded ``PIL.Image.Image``, through the same guarded path
        (these bytes already decoded within the limits, to exactly this size)."""
        return _decode(self.data, self.format, self.index, self.width * self.height)


ValidatedMedium = ValidatedImage | ValidatedAudio
"""What :func:`validate_images` gives for each medium of a request."""


def request_images(req: InferenceRequest) -> list[Any]:
    """Every medium (image or audio) of a request, in prompt order: each message's
    ``images`` for a chat (as every protocol's chat translation puts them), ``images`` for a
    generate."""
    if req.kind == "chat":
        return [image for message in req.messages for image in message.get("images") or ()]
    return list(req.images or ())


def check_count(count: int, limits: ImageLimits) -> None:
    """Refuse a request with more images than ``POLLAMA_MAX_IMAGES``."""
    if count > limits.max_images:
        raise InvalidImage(
            f"too many images: {count} is more than the limit of {limits.max_images} "
            "(POLLAMA_MAX_IMAGES)"
        )


def validate_images(images: Sequence[Any], limits: ImageLimits) -> list[ValidatedMedium]:
    """Check every medium of a request, in order: decode each image, read each audio
    clip's header (``inference.audio``); the first bad one raises :class:`InvalidImage` (or
    its :class:`InvalidAudio`) naming it. Only one decoded image is held at a time."""
    check_count(len(images), limits)
    budget = AudioBudget(limits.max_audio_seconds)
    numbers = {"image": 0, "audio": 0}
    media: list[ValidatedMedium] = []
    for item in images:
        kind = "audio" if isinstance(item, str) and is_audio(head_bytes(item)) else "image"
        numbers[kind] += 1
        index = numbers[kind]
        if kind == "image":
            media.append(validate_image(item, index, limits))
            continue
        data = decode_base64(item, index, limits.max_audio_bytes, audio=True)
        media.append(validate_audio(data, index, budget))
    return media


def validate_image(text: Any, index: int, limits: ImageLimits) -> ValidatedImage:
    """One base64 image, checked in the order of the module docstring, then decoded."""
    if not isinstance(text, str):
        raise InvalidImage(f"image {index} must be a base64 string", index)
    data = decode_base64(text, index, limits.max_bytes)
    fmt = _sniff(data)
    if fmt is None:
        hint = _looks_like(data)
        raise InvalidImage(
            f"image {index} is not a valid {SUPPORTED_FORMATS} image"
            + (f": it looks like {hint}" if hint else ""),
            index,
        )
    claimed = _claimed_size(data, fmt, index)
    if claimed is not None:
        _check_pixels(*claimed, index, limits.max_pixels)
    image = _decode(data, fmt, index, limits.max_pixels)
    try:
        width, height = image.size
    finally:
        image.close()
    return ValidatedImage(index, fmt, width, height, data)


# -- base64 ----------------------------------------------------------------------------------


def decode_base64(text: str, index: int, max_bytes: int, *, audio: bool = False) -> bytes:
    """Strict standard base64 (padding required; ``\\r``/``\\n`` skipped, as in Go), refused
    by its length alone when it would decode to more than ``max_bytes``. ``audio`` names
    the medium "audio N" (an :class:`InvalidAudio`) and its own byte cap."""
    noun, setting = ("audio", "POLLAMA_MAX_AUDIO_BYTES") if audio else (
        "image", "POLLAMA_MAX_IMAGE_BYTES")  # fmt: skip
    error = InvalidAudio if audio else InvalidImage
    if "\n" in text or "\r" in text:
        text = text.replace("\r", "").replace("\n", "")
    size = len(text) * 3 // 4 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)
    if size > max_bytes:
        raise error(
            f"{noun} {index}: {size} bytes is more than the limit of {max_bytes} ({setting})",
            index,
        )
    hint = (
        "; send only the base64 data, without the data: URL prefix"
        if text.startswith("data:")
        else f"; send the {noun} file as standard base64 (A-Z, a-z, 0-9, + and /, padded with =)"
    )
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise error(
            f"{noun} {index} is not valid base64 (it has non-ASCII characters){hint}", index
        ) from None
    try:
        data = binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error as exc:
        reason = str(exc)
        reason = reason[:1].lower() + reason[1:]
        raise error(f"{noun} {index} is not valid base64 ({reason}){hint}", index) from None
    if not data:
        raise error(f"{noun} {index} is empty", index)
    return data


# -- formats and claimed sizes ---------------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    """The format from the magic bytes, or None for anything we do not decode."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_like(data: bytes) -> str | None:
    head = data[:16].lstrip()
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return "an HEIC or AVIF image"
    return None


def _invalid(index: int, fmt: str, why: str) -> InvalidImage:
    return InvalidImage(
        f"image {index} is not a valid {SUPPORTED_FORMATS} image: {_NAMES[fmt]} {why}", index
    )


def _claimed_size(data: bytes, fmt: str, index: int) -> tuple[int, int] | None:
    """The largest size the header makes the decoder allocate, read without Pillow; None for
    JPEG, whose size Pillow reads without allocating (checked after it opens)."""
    if fmt == "PNG":
        if data[12:16] != b"IHDR" or len(data) < 24:
            raise _invalid(index, fmt, "data does not start with an IHDR chunk")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if fmt == "GIF":
        return _gif_size(data, index)
    if fmt == "WEBP":
        return _webp_size(data, index)
    return None


def _gif_size(data: bytes, index: int) -> tuple[int, int]:
    """The screen size, grown to hold the first frame (as Pillow grows it when it opens)."""
    if len(data) < 13:
        raise _invalid(index, "GIF", "data is truncated")
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13
    if flags & 0x80:  # global colour table
        pos += 3 << ((flags & 7) + 1)
    # Skip extension blocks up to the first image descriptor; each step moves forward.
    while pos < len(data):
        block = data[pos]
        if block == 0x2C:  # image descriptor: left, top, width, height
            if pos + 9 > len(data):
                break
            left, top, frame_w, frame_h = struct.unpack("<HHHH", data[pos + 1 : pos + 9])
            return max(width, left + frame_w), max(height, top + frame_h)
        if block != 0x21:  # neither an extension nor an image: the trailer or junk
            break
        pos += 2  # introducer and label, then data sub-blocks up to a zero length
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1
    return width, height  # no frame: Pillow refuses it when it opens


def _webp_size(data: bytes, index: int) -> tuple[int, int]:
    """The canvas size from a WebP file's first chunk (lossy ``VP8 ``, lossless ``VP8L``,
    extended ``VP8X``), per the WebP container specification."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise _invalid(index, "WEBP", "data has no VP8, VP8L or VP8X header")


def _check_pixels(width: int, height: int, index: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image {index} has no pixels ({width}x{height})", index)
    if width * height > max_pixels:
        raise InvalidImage(
            f"image {index}: {width}x{height} pixels is more than the limit of {max_pixels} "
            "(POLLAMA_MAX_IMAGE_PIXELS)",
            index,
        )


# -- decoding (Pillow) -----------------------------------------------------------------------


def _image_class(fmt: str, index: int) -> type[ImageFile]:
    """The Pillow ``ImageFile`` class of a format, imported on first use."""
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngImageFile

        return PngImageFile
    if fmt == "JPEG":
        from PIL.JpegImagePlugin import JpegImageFile

        return JpegImageFile
    if fmt == "GIF":
        from PIL.GifImagePlugin import GifImageFile

        return GifImageFile
    from PIL import WebPImagePlugin

    if not WebPImagePlugin.SUPPORTED:
        raise InvalidImage(
            f"image {index} is WebP, which this server's Pillow cannot decode; "
            "send PNG, JPEG or GIF",
            index,
        )
    return WebPImagePlugin.WebPImageFile


@contextmanager
def _pillow_errors(index: int, fmt: str) -> Iterator[None]:
    """Pillow's failures on hostile input as our 400s; a MemoryError stays a server error."""
    from PIL import Image

    try:
        yield
    except (InvalidImage, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own process-wide check fired before ours could: only possible when
        # POLLAMA_MAX_IMAGE_PIXELS is set above Pillow's limit (about 179 megapixels).
        raise InvalidImage(
            f"image {index} is too large to decode safely ({exc}); send a smaller image", index
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the data's fault
        detail = str(exc)[:200] or type(exc).__name__
        raise _invalid(index, fmt, f"data is damaged or truncated ({detail})") from exc


def _decode(data: bytes, fmt: str, index: int, max_pixels: int) -> Any:
    """Open with the format's class, check the size Pillow parsed, then decode the first
    frame; returns the loaded image (the caller closes it)."""
    cls = _image_class(fmt, index)
    with _pillow_errors(index, fmt):
        image = cls(io.BytesIO(data))
    try:
        with _pillow_errors(index, fmt):
            _check_pixels(*image.size, index, max_pixels)
            image.load()
    except BaseException:
        image.close()
        raise
    return image


# -- media types (data: URLs, Anthropic sources) ---------------------------------------------


def check_media_type(media_type: str, where: str) -> None:
    """Refuse a declared media type that is not one of the image types we decode."""
    media = media_type.strip().lower()
    if media and media not in MEDIA_TYPES:
        raise InvalidImage(
            f'{where} has media type "{media_type}": only image/png, image/jpeg, image/webp '
            "and image/gif are accepted"
        )


def image_from_data_url(url: Any) -> str:
    """The base64 payload of an OpenAI ``image_url``: only ``data:[image/...];base64,...``.

    Nothing is ever fetched (SSRF: a URL would let any client make the server request
    internal addresses); http(s) and every other scheme get Ollama's message. Audio data is
    refused here (it has its own part type), so an ``image_url`` is always an image.
    """
    if not isinstance(url, str):
        raise InvalidImage("image_url must have a url string (a data:image/...;base64 URL)")
    if not url[:5].lower() == "data:":
        raise InvalidImage(
            f"{URL_REFUSED} (a data:image/png;base64,... URL); pollama does not fetch URLs"
        )
    header, comma, payload = url[5:].partition(",")
    params = [part.strip().lower() for part in header.split(";")]
    if not comma or "base64" not in params[1:]:
        raise InvalidImage(
            "image_url data: URLs must be base64 encoded, like data:image/png;base64,..."
        )
    check_media_type(header.split(";")[0], "image_url")
    if is_audio(head_bytes(payload)):
        raise InvalidImage("image_url data is audio: send audio as an input_audio content part")
    return payload
