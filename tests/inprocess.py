"""An app with models, and the official clients served in-process by its TestClient.

The API tests that use a scripted fake runner (``tests/fake_runner.py``) all need the same things:
the app, a tiny GGUF uploaded as a blob, models created from it through ``/api/create``, and
the ``ollama``, ``openai`` and ``anthropic`` clients sending their requests through the
TestClient instead of a socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
from fastapi.testclient import TestClient
from starlette.types import Message

from fake_runner import FakeRunnerFactory
from pollama.config import Settings
from pollama.server.app import create_app

BASE = "http://127.0.0.1:11434"


def upload(api: TestClient, path: Path) -> str:
    """``path`` as a blob, as the CLI uploads it; its digest."""
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.post(f"/api/blobs/{digest}", content=data).status_code in (200, 201)
    return digest


def create(api: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A successful ``/api/create``'s progress lines."""
    response = api.post("/api/create", json=body)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1] == {"status": "success"}, lines
    return lines


def create_models(client: TestClient, gguf: Path, models: Mapping[str, Mapping[str, Any]]
                  ) -> None:
    """Upload ``gguf`` as a blob, then create each named model from it with the extra
    ``/api/create`` fields given (``template``…)."""
    data = gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
    for name, fields in models.items():
        r = client.post("/api/create", json={"model": name, "files": {gguf.name: digest},
                                             "stream": False, **fields})
        assert r.status_code == 200, r.text


@contextmanager
def serving(settings: Settings, factory: FakeRunnerFactory,
            models: Mapping[Path, Mapping[str, Mapping[str, Any]]]) -> Iterator[TestClient]:
    """The app over ``factory``'s fake runners, with the models ``{gguf: {name: fields}}``
    created, for as long as the block runs."""
    with TestClient(create_app(settings, runner_factory=factory), base_url=BASE) as client:
        for gguf, named in models.items():
            create_models(client, gguf, named)
        yield client


def native_client(api: TestClient) -> ollama.Client:
    client = ollama.Client(host=BASE)
    client._client = api  # the official client's calls, served in-process
    return client


def openai_client(api: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", http_client=api)


def anthropic_client(api: TestClient) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=BASE, api_key="unused", http_client=api)


async def post_then_leave(
    client: TestClient,
    path: str,
    body: dict[str, Any],
    leave: Callable[[], Awaitable[Any]],
    after_send: Callable[[list[Message]], Awaitable[None]] | None = None,
) -> list[Message]:
    """``POST`` ``body`` to ``path`` through the app's ASGI interface, as a client that
    disconnects once ``leave()`` returns; ``after_send(sent)`` runs after each message the
    app sends (a slow socket). Returns what the app sent."""
    data = json.dumps(body).encode()
    pending: list[Message] = [{"type": "http.request", "body": data, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await leave()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if after_send is not None:
            await after_send(sent)

    await asyncio.wait_for(client.app(_post_scope(path, data), receive, send), 5)
    return sent


def _post_scope(path: str, body: bytes) -> dict[str, Any]:
    """The ASGI scope of a JSON ``POST`` to ``path`` from a loopback client."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 11434),
        "headers": [(b"host", b"127.0.0.1:11434"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
