"""A client that leaves in the middle of a stream closes the generation behind it, in every
framing (Ollama's NDJSON, OpenAI's SSE, Anthropic's events).

The one stream driver (``server/streaming.py``) closes its event source under a shielded
cancel scope when the response ends however it ends. Without the shield, the close runs in
the cancelled response task: its first await is cancelled in turn, and the runner never
hears that the request is gone until garbage collection. Each request here is sent straight
to the ASGI app with a ``receive`` that reports ``http.disconnect`` once two body chunks were
sent, as uvicorn does when the socket closes; the fake runner streams slowly, so the
generation is still running when the client leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message

from fake_runner import FakeRunnerFactory
from ggufgen import write_tiny_model
from inprocess import post_then_leave, serving
from pollama.config import Settings

PLAIN = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>"
CHAT = [{"role": "user", "content": "Hi"}]
STREAMS: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": "m", "prompt": "Hi"},
    "/api/chat": {"model": "m", "messages": CHAT},
    "/v1/chat/completions": {"model": "m", "messages": CHAT, "stream": True},
    "/v1/completions": {"model": "m", "prompt": "Hi", "stream": True},
    "/v1/messages": {"model": "m", "max_tokens": 100, "messages": CHAT, "stream": True},
}


@pytest.fixture
def slow(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, FakeRunnerFactory]]:
    """The app over fake runners that stream 200 chunks, 20 ms apart."""
    factory = FakeRunnerFactory(script=["x"] * 200, chunk_delay=0.02)
    gguf = write_tiny_model(tmp_path / "m.gguf")
    with serving(settings, factory, {gguf: {"m": {"template": PLAIN}}}) as client:
        yield client, factory


async def _read_two_chunks_and_leave(client: TestClient, path: str, body: dict[str, Any]
                                     ) -> list[Message]:
    gone = asyncio.Event()

    async def slow_socket(sent: list[Message]) -> None:
        if sum(m["type"] == "http.response.body" for m in sent) >= 2:
            gone.set()
            await asyncio.sleep(1)  # a slow socket: the client leaves while this is sent

    return await post_then_leave(client, path, body, gone.wait, slow_socket)


@pytest.mark.parametrize("path", list(STREAMS))
def test_a_client_that_leaves_a_stream_cancels_its_generation(
    slow: tuple[TestClient, FakeRunnerFactory], path: str
) -> None:
    client, factory = slow
    assert client.portal is not None
    sent = client.portal.call(_read_two_chunks_and_leave, client, path, STREAMS[path])
    assert sent[0]["status"] == 200
    runner = factory.runners[-1]
    assert runner.active == 0  # closed as the response ended, not at garbage collection
    assert runner.cancelled == 1
