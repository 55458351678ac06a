"""A client that leaves before a non-streamed answer is ready cancels the work (issue point 6).

Each request is sent straight to the ASGI app (in the TestClient's event loop) with a
``receive`` that delivers the body, then reports ``http.disconnect`` a moment later, as
uvicorn does when the socket closes. The fake runner holds every generation until released,
so before the fix each of these requests waited forever for a client long gone. With the
real server and model: ``tests/test_e2e_cancel.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import post_then_leave, serving
from pollama.config import Settings, load_settings
from pollama.server.disconnect import while_connected
from pollama.server.errors import ClientDisconnected
from registry_helpers import FaultProxy, Reply, Request

PLAIN = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>"
CHAT = [{"role": "user", "content": "Hi"}]
REQUESTS: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": "m", "prompt": "Hi", "stream": False},
    "/api/chat": {"model": "m", "messages": CHAT, "stream": False},
    "/v1/chat/completions": {"model": "m", "messages": CHAT},
    "/v1/completions": {"model": "m", "prompt": "Hi"},
    "/v1/messages": {"model": "m", "max_tokens": 100, "messages": CHAT},
    "/api/embed": {"model": "m", "input": "Hi"},
    "/api/embeddings": {"model": "m", "prompt": "Hi"},
    "/v1/embeddings": {"model": "m", "input": "Hi"},
}


@pytest.fixture
def held(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, FakeRunnerFactory]]:
    """The app over fake runners that never finish a generation on their own."""
    factory = FakeRunnerFactory(hold=asyncio.Event())  # never set: released by cancelling
    gguf = write_tiny_model(tmp_path / "m.gguf")
    with serving(settings, factory, {gguf: {"m": {"template": PLAIN}}}) as client:
        yield client, factory


@pytest.mark.parametrize("path", list(REQUESTS))
def test_a_client_that_leaves_cancels_its_request(
    held: tuple[TestClient, FakeRunnerFactory], path: str
) -> None:
    client, factory = held
    assert client.portal is not None
    sent = client.portal.call(
        post_then_leave, client, path, REQUESTS[path], lambda: asyncio.sleep(0.3)
    )
    assert sent[0]["status"] == 499  # only the access log and the metrics see it
    runner = factory.runners[-1]
    assert runner.active == 0  # the work is gone, not left waiting
    if not path.endswith(("embed", "embeddings")):
        assert runner.cancelled == 1  # the generation itself was closed: cancel sent
    text = client.get("/metrics").text
    assert f'route="{path}",status="499"' in text


def test_a_non_streamed_pull_stops_when_its_client_leaves(isolated_env: Path) -> None:
    release = threading.Event()

    async def stalls(request: Request) -> Reply | None:
        while not release.is_set():  # a registry that does not answer the manifest
            await asyncio.sleep(0.02)
        return Reply(404)

    registry = FaultProxy(hook=stalls)
    try:
        settings = load_settings(registry_hosts=(registry.netloc,))
        with TestClient(serving_app(settings), base_url="http://127.0.0.1:11434") as client:
            assert client.portal is not None
            body = {"model": f"{registry.netloc}/library/x", "insecure": True, "stream": False}
            sent = client.portal.call(
                post_then_leave, client, "/api/pull", body, lambda: asyncio.sleep(0.5)
            )
        assert sent[0]["status"] == 499
        assert [r.path for r in registry.requests] == ["/v2/library/x/manifests/latest"]
    finally:
        release.set()
        time.sleep(0.1)  # the stalled answer goes to a closed socket, then the proxy stops
        registry.stop()


def serving_app(settings: Settings) -> Any:
    from pollama.server.app import create_app

    return create_app(settings)


def test_while_connected_returns_the_result_of_work_that_ends_first() -> None:
    async def body() -> None:
        async def receive() -> Message:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        async def work() -> str:
            await asyncio.sleep(0.01)
            return "done"

        assert await while_connected(receive, work()) == "done"

        async def gone() -> Message:
            return {"type": "http.disconnect"}

        cleaned = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                cleaned.set()

        with pytest.raises(ClientDisconnected):
            await while_connected(gone, forever())
        assert cleaned.is_set()  # the work's clean-up ran before the error was raised

    asyncio.run(asyncio.wait_for(body(), 5))
