"""``pollama.inference.images``: every request image is checked in order, then decoded.

Bombs are built from the format specifications (``imagegen``); the "before decoding" tests
make any decode (or, for headers we parse ourselves, any Pillow call) fail the test.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from typing import Any

import pytest
from PIL import ImageFile, features

from imagegen import (
    b64,
    encoded,
    gif,
    jpeg_claiming,
    png_bomb,
    png_claiming,
    png_gray,
    webp_vp8l_claiming,
    webp_vp8x_claiming,
)
from pollama.config import load_settings
from pollama.errors import InvalidImage, InvalidRequest
from pollama.inference import images
from pollama.inference.images import (
    URL_REFUSED,
    ImageLimits,
    image_from_data_url,
    request_images,
    validate_image,
    validate_images,
)
from pollama.inference.types import InferenceRequest

LIMITS = ImageLimits(max_images=4, max_bytes=1 << 20, max_pixels=50_000_000)
FORMATS = ["PNG", "JPEG", "GIF"] + (["WEBP"] if features.check("webp") else [])


def refused(text: Any, limits: ImageLimits = LIMITS, index: int = 1) -> str:
    with pytest.raises(InvalidImage) as info:
        validate_image(text, index, limits)
    assert isinstance(info.value, InvalidRequest)  # a 400 on every protocol
    assert info.value.index == index
    return str(info.value)


# -- valid images ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_valid_image_is_decoded_and_kept_as_sent(fmt: str) -> None:
    data = encoded(fmt, (8, 6), (200, 30, 60))
    image = validate_image(b64(data), 3, LIMITS)
    assert (image.index, image.format, image.width, image.height) == (3, fmt, 8, 6)
    assert image.data == data
    pixels = image.decode()
    try:
        assert pixels.size == (8, 6)
        red, green, blue = pixels.convert("RGB").getpixel((4, 3))
        assert abs(red - 200) < 12 and abs(green - 30) < 12 and abs(blue - 60) < 12
    finally:
        pixels.close()


def test_line_breaks_in_base64_are_skipped_as_go_does() -> None:
    data = encoded("PNG")
    wrapped = base64.encodebytes(data).decode().replace("\n", "\r\n")  # 76-column lines
    assert "\n" in wrapped
    assert validate_image(wrapped, 1, LIMITS).data == data


# -- decompression bombs -----------------------------------------------------------------------

HEADER_BOMBS = {  # refused from our own header parse: Pillow is never called
    "png ihdr": (png_claiming(100000, 100000), "100000x100000"),
    "png streamed": (None, "20000x20000"),  # png_bomb(), built on first use
    "gif screen": (gif((65535, 65535), (1, 1)), "65535x65535"),
    "gif first frame": (gif((16, 16), (16000, 16000), disposal=2), "16000x16000"),
    "webp vp8l": (webp_vp8l_claiming(16384, 16384), "16384x16384"),
    "webp vp8x": (webp_vp8x_claiming(1 << 24, 1 << 24), "16777216x16777216"),
}


@pytest.mark.parametrize("name", list(HEADER_BOMBS))
def test_a_bomb_is_refused_from_its_header_before_pillow(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, dims = HEADER_BOMBS[name]
    data = png_bomb() if data is None else data

    def no_pillow(fmt: str, index: int) -> Any:
        raise AssertionError("Pillow was asked to open a bomb")

    monkeypatch.setattr(images, "_image_class", no_pillow)
    assert refused(b64(data), index=2) == (
        f"image 2: {dims} pixels is more than the limit of 50000000 (POLLAMA_MAX_IMAGE_PIXELS)"
    )


def test_a_jpeg_bomb_is_refused_from_pillows_header_parse_before_decoding(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(self: Any) -> Any:
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    assert refused(b64(jpeg_claiming(60000, 60000))) == (
        "image 1: 60000x60000 pixels is more than the limit of 50000000 (POLLAMA_MAX_IMAGE_PIXELS)"
    )


def test_the_pixel_limit_is_width_times_height_of_a_real_image() -> None:
    data = b64(png_gray(6000, 6000))  # 36 megapixels, 44 KiB: it does decode
    assert refused(data, ImageLimits(1, 1 << 20, 35_999_999)).startswith(
        "image 1: 6000x6000 pixels is more than the limit of 35999999")
    image = validate_image(data, 1, ImageLimits(1, 1 << 20, 36_000_000))
    assert (image.width, image.height) == (6000, 6000)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow without WebP")
def test_a_real_webp_over_the_limit_is_refused() -> None:
    data = b64(encoded("WEBP", (300, 200)))
    assert refused(data, ImageLimits(1, 1 << 20, 59_999)) == (
        "image 1: 300x200 pixels is more than the limit of 59999 (POLLAMA_MAX_IMAGE_PIXELS)")
    assert validate_image(data, 1, ImageLimits(1, 1 << 20, 60_000)).width == 300


def test_pillows_own_limit_still_holds_when_ours_is_higher() -> None:
    # Our limit lets 256 megapixels through; Pillow's (about 179) refuses when the GIF opens.
    message = refused(b64(gif((16, 16), (16000, 16000), disposal=2)), ImageLimits(1, 1 << 20,
                                                                                  10**9))
    assert message.startswith("image 1 is too large to decode safely (Image size (256000000")
    assert message.endswith("; send a smaller image")


# -- damaged, unsupported, empty ---------------------------------------------------------------


def _truncated(fmt: str) -> bytes:
    data = encoded(fmt, (300, 300), (10, 20, 30))
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (_truncated("PNG"), ": PNG data is damaged or truncated (image file is truncated"),
        (_truncated("JPEG"), ": JPEG data is damaged or truncated ("),
        (_truncated("GIF"), ": GIF data is damaged or truncated ("),
        (b"\x89PNG\r\n\x1a\n" + b"junk" * 8, ": PNG data does not start with an IHDR chunk"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8Z" + bytes(20), ": WebP data has no VP8, VP8L or VP8X "),
        (b"GIF89a\x01", ": GIF data is truncated"),
        (encoded("BMP"), ": it looks like a BMP image"),
        (encoded("TIFF"), ": it looks like a TIFF image"),
        (b"%PDF-1.7\n", ": it looks like a PDF document"),
        (b"hello, world", ""),
    ],
    ids=["png-cut", "jpeg-cut", "gif-cut", "png-junk", "webp-chunk", "gif-short", "bmp", "tiff",
         "pdf", "text"],
)
def test_damaged_or_unsupported_data_is_refused(data: bytes, detail: str) -> None:
    message = refused(b64(data), index=2)
    assert message.startswith("image 2 is not a valid PNG, JPEG, WebP or GIF image" + detail)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow without WebP")
def test_a_damaged_webp_is_refused() -> None:
    assert refused(b64(_truncated("WEBP"))).startswith(
        "image 1 is not a valid PNG, JPEG, WebP or GIF image: WebP data is damaged or truncated")


def test_an_image_without_pixels_is_refused() -> None:
    assert refused(b64(png_claiming(0, 5))) == "image 1 has no pixels (0x5)"


def test_empty_and_non_string_images() -> None:
    assert refused("") == "image 1 is empty"
    assert refused(12345) == "image 1 must be a base64 string"


# -- base64 and the byte limit -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("iVBORw0KGgo!!!!", "only base64 data is allowed"),
        (b64(b"\x89PNG\r\n\x1a\nxx").rstrip("="), "incorrect padding"),
        ("iVBORw0KGgo-_AA", "only base64 data is allowed"),  # URL-safe alphabet
        ("==iVBORw0KGgoAA", "leading padding not allowed"),
    ],
)
def test_base64_is_strict(text: str, reason: str) -> None:
    assert refused(text, index=3) == (
        f"image 3 is not valid base64 ({reason}); send the image file as standard base64 "
        "(A-Z, a-z, 0-9, + and /, padded with =)"
    )


def test_a_data_url_on_the_native_api_says_to_drop_the_prefix() -> None:
    message = refused("data:image/png;base64," + b64(encoded("PNG")))
    assert message.startswith("image 1 is not valid base64 (")
    assert message.endswith("; send only the base64 data, without the data: URL prefix")


def test_non_ascii_is_not_base64() -> None:
    assert refused("iVBORw0KGgo\u00e9AAA").startswith(
        "image 1 is not valid base64 (it has non-ASCII characters)")


def test_the_byte_limit_is_checked_from_the_length_before_decoding(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = ImageLimits(1, 1024, 50_000_000)
    at_limit = b"\x89PNG\r\n\x1a\n" + bytes(1016)
    assert "bytes is more than" not in refused(b64(at_limit), limits)  # refused as a PNG
    over = b64(at_limit + b"\x00")

    def no_decode(*_args: Any, **_kwargs: Any) -> bytes:
        raise AssertionError("decoded an image over the byte limit")

    monkeypatch.setattr(images.binascii, "a2b_base64", no_decode)
    assert refused(over, limits) == (
        "image 1: 1025 bytes is more than the limit of 1024 (POLLAMA_MAX_IMAGE_BYTES)")


def test_the_number_of_images_is_limited() -> None:
    one = b64(encoded("PNG"))
    assert len(validate_images([one] * 4, LIMITS)) == 4
    with pytest.raises(InvalidImage) as info:
        validate_images([one] * 5, LIMITS)
    assert str(info.value) == "too many images: 5 is more than the limit of 4 (POLLAMA_MAX_IMAGES)"
    with pytest.raises(InvalidImage, match="too many images: 1 is more than the limit of 0"):
        validate_images([one], ImageLimits(0, 1 << 20, 1000))


def test_images_are_numbered_from_one_in_request_order() -> None:
    good, bad = b64(encoded("PNG")), b64(png_claiming(100000, 100000))
    with pytest.raises(InvalidImage, match=r"^image 3: 100000x100000 pixels") as info:
        validate_images([good, good, bad, good], LIMITS)
    assert info.value.index == 3


def test_request_images_follow_the_prompt_order() -> None:
    chat = InferenceRequest(model="m", kind="chat", messages=[
        {"role": "user", "content": "a", "images": ["A", "B"]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c", "images": ["C"]},
    ])
    assert request_images(chat) == ["A", "B", "C"]
    assert request_images(InferenceRequest(model="m", kind="generate", images=["X"])) == ["X"]
    assert request_images(InferenceRequest(model="m", kind="generate")) == []


# -- data: URLs (OpenAI image_url) -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64,QUJD", "data:;base64,QUJD", "DATA:IMAGE/JPEG;BASE64,QUJD",
     "data:image/jpg;base64,QUJD", "data:image/webp;base64,QUJD", "data:image/gif;base64,QUJD"],
)
def test_base64_image_data_urls_give_their_payload(url: str) -> None:
    assert image_from_data_url(url) == "QUJD"


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "https://example.com/cat.png",
     "HTTP://127.0.0.1:11434/api/tags", "file:///etc/passwd", "ftp://example.com/a.png",
     "//example.com/cat.png", "cat.png"],
)
def test_urls_are_never_fetched(url: str) -> None:
    with pytest.raises(InvalidImage) as info:
        image_from_data_url(url)
    assert str(info.value) == (
        f"{URL_REFUSED} (a data:image/png;base64,... URL); pollama does not fetch URLs")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png,rawbytes", "image_url data: URLs must be base64 encoded, like "
         "data:image/png;base64,..."),
        ("data:image/png;base64", "image_url data: URLs must be base64 encoded, like "
         "data:image/png;base64,..."),
        ("data:text/plain;base64,QUJD", 'image_url has media type "text/plain": only '
         "image/png, image/jpeg, image/webp and image/gif are accepted"),
        ("data:image/svg+xml;base64,QUJD", 'image_url has media type "image/svg+xml": only '
         "image/png, image/jpeg, image/webp and image/gif are accepted"),
        (None, "image_url must have a url string (a data:image/...;base64 URL)"),
    ],
)
def test_bad_data_urls(url: Any, message: str) -> None:
    with pytest.raises(InvalidImage) as info:
        image_from_data_url(url)
    assert str(info.value) == message


# -- settings and import cost ------------------------------------------------------------------


def test_limits_come_from_the_environment() -> None:
    defaults = ImageLimits.from_settings(load_settings({}))
    assert defaults == ImageLimits(max_images=16, max_bytes=20 << 20, max_pixels=50_000_000)
    settings = load_settings({"POLLAMA_MAX_IMAGES": "2", "POLLAMA_MAX_IMAGE_BYTES": "1000",
                              "POLLAMA_MAX_IMAGE_PIXELS": "'4096'"})
    assert ImageLimits.from_settings(settings) == ImageLimits(2, 1000, 4096)
    assert load_settings({"POLLAMA_MAX_IMAGE_PIXELS": "-1"}).max_image_pixels == 50_000_000


def test_the_server_does_not_import_pillow_until_an_image_arrives() -> None:
    code = (
        "import sys\n"
        "from pollama.config import load_settings\n"
        "from pollama.server.app import create_app\n"
        "create_app(load_settings({}))\n"
        "assert 'PIL' not in sys.modules, 'Pillow imported at startup'\n"
        "from pollama.inference.images import ImageLimits, validate_image\n"
        "validate_image('R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7', 1,\n"
        "               ImageLimits(1, 100, 100))\n"
        "assert 'PIL' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_server_does_not_import_numpy_or_gguf_until_a_model_needs_them() -> None:
    """numpy (~15 MiB resident) loads with the first embedding, image or conversion, not at
    start: the safetensors converter's package stays light until a folder is converted."""
    code = (
        "import sys\n"
        "from pollama.config import load_settings\n"
        "from pollama.server.app import create_app\n"
        "create_app(load_settings({}))\n"
        "assert 'numpy' not in sys.modules and 'gguf' not in sys.modules, 'imported at start'\n"
        "from pollama import convert\n"
        "assert convert.is_safetensors_upload(['model.safetensors'])\n"
        "assert 'numpy' not in sys.modules\n"
        "assert 'BertModel' in convert.KNOWN_ARCHITECTURES and 'numpy' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
