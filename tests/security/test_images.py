"""Image input on every route: decompression bombs, damaged files, byte and count caps, URLs.

CVE-2026-46603 (Ollama's image decoding) and vLLM's CVE-2026-25960 (SSRF through media URLs)
in docs/security.md#images: a bomb or a bad image is a 400 that says what to fix, on
``/api/generate``, ``/api/chat``, ``/v1/chat/completions`` and ``/v1/messages`` alike; the
server never decodes past its limits, never fetches an image URL, and keeps serving.

The first half runs in-process (fake runner, tiny models: one without and one with the
vision capability); the second half, marked slow, sends the same bombs to a real
``pollama serve`` with the real model and watches the server's peak memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import features

from conftest import MODEL, RunningServer
from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from imagegen import b64, encoded, gif, jpeg_claiming, png_bomb, png_claiming, webp_vp8l_claiming
from pollama.config import load_settings
from pollama.errors import CapabilityMissing
from pollama.inference.images import URL_REFUSED, ValidatedImage
from pollama.inference.types import InferenceRequest
from pollama.server.app import create_app

BASE = "http://127.0.0.1:11434"
PLAIN = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>"
LIMIT = "is more than the limit of 50000000 (POLLAMA_MAX_IMAGE_PIXELS)"
INVALID = "is not a valid PNG, JPEG, WebP or GIF image"
Result = tuple[int, str]


class Routes:
    """The four ways an image reaches the server, through the clients people use; each
    returns (status, error message), with (200, "") for a success."""

    def __init__(self, base: str, http: httpx.Client, *, in_process: bool = False) -> None:
        self.http = http
        # In-process, the SDKs send through the TestClient; otherwise over their own clients.
        sdk_http: Any = {"http_client": http} if in_process else {}
        self.oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                 **sdk_http)
        self.claude = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0,
                                          **sdk_http)

    def close(self) -> None:
        self.oai.close()
        self.claude.close()

    def generate(self, model: str, images: list[str]) -> Result:
        r = self.http.post("/api/generate", json={
            "model": model, "prompt": "What is this?", "images": images, "stream": False,
            "options": {"num_predict": 2}})
        return r.status_code, r.json().get("error", "") if r.status_code != 200 else ""

    def chat(self, model: str, images: list[str]) -> Result:
        # the images go one per message, after a message without any: numbering spans them
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Hello"}]
        messages += [{"role": "user", "content": "And this?", "images": [i]} for i in images]
        r = self.http.post("/api/chat", json={"model": model, "messages": messages,
                                              "stream": False, "options": {"num_predict": 2}})
        return r.status_code, r.json().get("error", "") if r.status_code != 200 else ""

    def openai_urls(self, model: str, urls: list[str]) -> Result:
        content: list[Any] = [{"type": "text", "text": "What is this?"}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        try:
            self.oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=2)
        except openai.APIStatusError as exc:
            error = exc.response.json()["error"]
            assert error["type"] == ("invalid_request_error" if exc.status_code == 400
                                     else error["type"])
            return exc.status_code, error["message"]
        return 200, ""

    def openai(self, model: str, images: list[str]) -> Result:
        return self.openai_urls(model, [f"data:image/png;base64,{i}" for i in images])

    def anthropic_sources(self, model: str, sources: list[dict[str, Any]]) -> Result:
        content: list[Any] = [{"type": "text", "text": "What is this?"}]
        content += [{"type": "image", "source": source} for source in sources]
        try:
            self.claude.messages.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": content}])
        except anthropic.APIStatusError as exc:
            body = exc.response.json()
            assert body["type"] == "error"
            if exc.status_code == 400:
                assert body["error"]["type"] == "invalid_request_error"
            return exc.status_code, body["error"]["message"]
        return 200, ""

    def anthropic(self, model: str, images: list[str]) -> Result:
        return self.anthropic_sources(
            model, [{"type": "base64", "media_type": "image/png", "data": i} for i in images])

    def each(self) -> dict[str, Callable[[str, list[str]], Result]]:
        return {"generate": self.generate, "chat": self.chat, "openai": self.openai,
                "anthropic": self.anthropic}


ROUTES = ["generate", "chat", "openai", "anthropic"]


def _bombs() -> dict[str, tuple[bytes, str]]:
    """Each bomb and the end of its message (built on use: the 20000x20000 PNG is cached)."""
    return {
        "png-ihdr": (png_claiming(100000, 100000), f"100000x100000 pixels {LIMIT}"),
        "png-20000": (png_bomb(), f"20000x20000 pixels {LIMIT}"),
        "jpeg-sof": (jpeg_claiming(60000, 60000), f"60000x60000 pixels {LIMIT}"),
        "gif-frame": (gif((16, 16), (16000, 16000), disposal=2), f"16000x16000 pixels {LIMIT}"),
        "webp-vp8l": (webp_vp8l_claiming(16384, 16384), f"16384x16384 pixels {LIMIT}"),
    }


BOMBS = ["png-ihdr", "png-20000", "jpeg-sof", "gif-frame", "webp-vp8l"]


def _truncated_png() -> bytes:
    data = encoded("PNG", (300, 300), (10, 20, 30))
    return data[: len(data) // 2]


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that serves a valid PNG to anyone and records every request: the
    target an SSRF through an image URL would reach."""
    hits: list[str] = []
    png = encoded("PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/cat.png"
    assert httpx.get(url).status_code == 200 and hits == ["/cat.png"]  # it does record
    hits.clear()
    yield url, hits
    server.shutdown()
    server.server_close()


# -- in-process ------------------------------------------------------------------------------


class App:
    def __init__(self, client: TestClient, factory: FakeRunnerFactory) -> None:
        self.client = client
        self.factory = factory
        self.routes = Routes(BASE, client, in_process=True)


@pytest.fixture
def make_app(isolated_env: Path, tmp_path: Path) -> Iterator[Callable[..., App]]:
    """``make_app(**settings)``: the app in-process with a fake runner and two tiny models,
    ``plain`` (no vision) and ``seer`` (a GGUF with vision blocks, so it has vision)."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> App:
        factory = FakeRunnerFactory()
        client = TestClient(create_app(load_settings(**overrides), runner_factory=factory),
                            base_url=BASE)
        client.__enter__()
        clients.append(client)
        for name, extra in (("plain", None), ("seer", {"llama.vision.block_count": 1})):
            data = write_tiny_model(tmp_path / f"{name}-{len(clients)}.gguf",
                                    extra_kv=extra).read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
            r = client.post("/api/create", json={"model": name, "files": {"m.gguf": digest},
                                                 "template": PLAIN, "stream": False})
            assert r.status_code == 200, r.text
        caps = client.post("/api/show", json={"model": "seer"}).json()["capabilities"]
        assert "vision" in caps
        return App(client, factory)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def app(make_app: Callable[..., App]) -> App:
    return make_app()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bomb", BOMBS)
@pytest.mark.parametrize("model", ["plain", "seer"])
def test_a_bomb_is_a_400_naming_the_limit(app: App, route: str, bomb: str, model: str) -> None:
    data, message = _bombs()[bomb]
    if bomb == "webp-vp8l" and not features.check("webp"):
        pytest.skip("Pillow without WebP")
    send = app.routes.each()[route]
    assert send(model, [b64(encoded("PNG")), b64(data)]) == (400, f"image 2: {message}")
    assert app.factory.runners == []  # refused before any model was loaded


@pytest.mark.parametrize("route", ROUTES)
def test_a_damaged_image_is_a_400(app: App, route: str) -> None:
    status, message = app.routes.each()[route]("seer", [b64(_truncated_png())])
    assert status == 400
    assert message.startswith(f"image 1 {INVALID}: PNG data is damaged or truncated (")


@pytest.mark.parametrize("route", ROUTES)
def test_a_valid_image_still_meets_the_vision_check(app: App, route: str) -> None:
    # Before the images were checked in one place, /v1 images never reached this check.
    assert app.routes.each()[route]("plain", [b64(encoded("JPEG"))]) == (
        400, '"plain" does not support images: it has no vision capability')


@pytest.mark.parametrize("route", ["generate", "chat", "anthropic"])
def test_non_base64_is_a_400_naming_the_image(app: App, route: str) -> None:
    status, message = app.routes.each()[route]("seer", [b64(encoded("PNG")), "not base64!"])
    assert status == 400
    assert message.startswith("image 2 is not valid base64 (only base64 data is allowed)")


def test_a_valid_image_is_decoded_then_refused_rather_than_dropped(app: App) -> None:
    """``seer`` sees through vision blocks in its own GGUF, which llama.cpp cannot run
    without a projector file: a valid image to it is checked and decoded (a bad one gets
    its own 400), then the request is refused with what to do, never answered without it."""
    data = encoded("PNG", (7, 5))
    service = app.client.app.state.inference  # type: ignore[attr-defined]
    request = InferenceRequest(model="seer", kind="chat", messages=[
        {"role": "user", "content": "hi", "images": [b64(data)]}])  # fmt: skip
    assert asyncio.run(service._validate_images(request)) == [ValidatedImage(1, "PNG", 7, 5, data)]
    with pytest.raises(CapabilityMissing, match="no projector layer.*second FROM line"):
        asyncio.run(service.prepare(request))


def test_images_decode_off_the_event_loop_in_threads_that_end_with_the_app(
    make_app: Callable[..., App]
) -> None:
    def pool() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("pollama-images")]

    app = make_app()
    assert app.routes.generate("plain", [b64(encoded("PNG"))])[0] == 400
    assert pool()  # the decode ran in the service's pool, not on the event loop
    app.client.__exit__(None, None, None)  # the app's shutdown
    deadline = time.monotonic() + 10
    while pool() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool() == []


def test_openai_http_image_urls_are_refused_and_never_fetched(
    app: App, listener: tuple[str, list[str]]
) -> None:
    url, hits = listener
    for model in ("plain", "seer"):
        assert app.routes.openai_urls(model, [url]) == (
            400, f"{URL_REFUSED} (a data:image/png;base64,... URL); pollama does not fetch URLs")
    assert hits == []


def test_openai_data_urls_must_be_base64_images(app: App) -> None:
    png = b64(encoded("PNG"))
    assert app.routes.openai_urls("seer", [f"data:text/plain;base64,{png}"]) == (
        400, 'image_url has media type "text/plain": only image/png, image/jpeg, image/webp '
        "and image/gif are accepted")
    assert app.routes.openai_urls("seer", ["data:image/png,raw"]) == (
        400, "image_url data: URLs must be base64 encoded, like data:image/png;base64,...")


def test_anthropic_url_sources_are_refused_and_never_fetched(
    app: App, listener: tuple[str, list[str]]
) -> None:
    url, hits = listener
    assert app.routes.anthropic_sources("seer", [{"type": "url", "url": url}]) == (
        400, 'image source type "url" is not supported (pollama does not fetch URLs); send '
        '{"type": "base64", "media_type": "image/png", "data": "<base64>"} instead')
    assert hits == []
    png = b64(encoded("PNG"))
    assert app.routes.anthropic_sources(
        "seer", [{"type": "base64", "media_type": "application/pdf", "data": png}]) == (
        400, 'image source has media type "application/pdf": only image/png, image/jpeg, '
        "image/webp and image/gif are accepted")


def test_anthropic_tool_result_images_are_checked_too(app: App) -> None:
    bomb = b64(png_claiming(100000, 100000))
    messages: list[Any] = [
        {"role": "user", "content": "Take a screenshot."},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "here"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": bomb}}]}]},
    ]
    r = app.client.post("/v1/messages", json={"model": "seer", "max_tokens": 2,
                                              "messages": messages})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f"image 1: 100000x100000 pixels {LIMIT}"


@pytest.mark.parametrize("route", ROUTES)
def test_count_and_byte_caps_follow_the_settings(make_app: Callable[..., App], route: str
                                                 ) -> None:
    app = make_app(max_images=2, max_image_bytes=4096, max_image_pixels=10_000)
    send = app.routes.each()[route]
    png = b64(encoded("PNG"))
    assert send("seer", [png] * 3) == (
        400, "too many images: 3 is more than the limit of 2 (POLLAMA_MAX_IMAGES)")
    big = b64(b"\x89PNG\r\n\x1a\n" + bytes(4089))
    assert send("seer", [png, big]) == (
        400, "image 2: 4097 bytes is more than the limit of 4096 (POLLAMA_MAX_IMAGE_BYTES)")
    assert send("seer", [b64(encoded("PNG", (101, 100)))]) == (
        400, "image 1: 101x100 pixels is more than the limit of 10000 (POLLAMA_MAX_IMAGE_PIXELS)")
    assert send("plain", [png, png]) == (
        400, '"plain" does not support images: it has no vision capability')


# -- a real server with the real model (slow) ------------------------------------------------


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture
def real(model_server: RunningServer) -> Iterator[Routes]:
    with httpx.Client(base_url=model_server.url, timeout=120) as http:
        routes = Routes(model_server.url, http)
        yield routes
        routes.close()


@pytest.mark.slow
def test_real_server_refuses_bombs_on_every_route_and_keeps_serving(
    model_server: RunningServer, real: Routes
) -> None:
    if not Path(f"/proc/{model_server.process.pid}/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    bombs = _bombs()
    if not features.check("webp"):
        del bombs["webp-vp8l"]
    before = _memory_kib(model_server.process.pid)
    for route, send in real.each().items():
        for name, (data, message) in bombs.items():
            assert send(MODEL, [b64(data)]) == (400, f"image 1: {message}"), (route, name)
        status, message = send(MODEL, [b64(_truncated_png())])
        assert status == 400 and message.startswith(f"image 1 {INVALID}: PNG data is"), route
        assert send(MODEL, [b64(encoded("PNG"))]) == (
            400, f'"{MODEL}" does not support images: it has no vision capability'), route
    after = _memory_kib(model_server.process.pid)
    # The 20000x20000 bomb alone would need 400 MB as pixels; Pillow, the request bodies and
    # their base64 cost a few tens of MB.
    assert after["VmHWM"] - before["VmHWM"] < 150 * 1024, (before, after)
    assert model_server.process.poll() is None
    r = real.http.post("/api/generate", json={"model": MODEL, "prompt": "Say hi.",
                                              "stream": False, "options": {"num_predict": 4}})
    assert r.status_code == 200 and r.json()["done"] is True


@pytest.mark.slow
def test_real_server_never_fetches_image_urls(
    real: Routes, listener: tuple[str, list[str]]
) -> None:
    url, hits = listener
    assert real.openai_urls(MODEL, [url]) == (
        400, f"{URL_REFUSED} (a data:image/png;base64,... URL); pollama does not fetch URLs")
    status, message = real.anthropic_sources(MODEL, [{"type": "url", "url": url}])
    assert status == 400 and message.startswith('image source type "url" is not supported')
    assert hits == []


@pytest.mark.slow
def test_real_server_default_caps(real: Routes) -> None:
    png = b64(encoded("PNG"))
    assert real.chat(MODEL, [png] * 17) == (
        400, "too many images: 17 is more than the limit of 16 (POLLAMA_MAX_IMAGES)")
    status, message = real.generate(MODEL, [png, "iVBORw0KGgo%%%%"])
    assert status == 400 and message.startswith("image 2 is not valid base64")
    over = b64(b"\x89PNG\r\n\x1a\n" + bytes((20 << 20) - 7))  # 20 MiB + 1, 28 MB of base64
    assert real.generate(MODEL, [over]) == (
        400, "image 1: 20971521 bytes is more than the limit of 20971520 "
        "(POLLAMA_MAX_IMAGE_BYTES)")
