"""Limits: body size caps, concurrent uploads, slow clients (slow-loris), Retry-After."""

from __future__ import annotations

import gzip
import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import RunningServer, stop_server
from pollama.errors import ServerBusy
from pollama.server.limits import client_key

from .conftest import launch


def test_declared_body_over_the_cap_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(POLLAMA_MAX_BODY_SIZE="1000")
    response = client.post("/api/show", content=b"{" + b" " * 2000 + b"}",
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 413
    assert "POLLAMA_MAX_BODY_SIZE" in response.json()["error"]
    v1 = client.post("/v1/chat/completions", content=b"x" * 2000)
    assert v1.status_code == 413 and "POLLAMA_MAX_BODY_SIZE" in v1.json()["error"]["message"]
    small = client.post("/api/show", json={"model": "nope"})
    assert small.status_code == 404


def test_chunked_body_over_the_cap_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(POLLAMA_MAX_BODY_SIZE="1000")

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 200

    response = client.post("/api/show", content=chunks())
    assert response.status_code == 413


def test_blob_uploads_are_not_capped_by_the_body_size(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(POLLAMA_MAX_BODY_SIZE="1000")
    data = b"z" * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201


def test_compressed_bodies_are_not_inflated(make_client: Callable[..., TestClient]) -> None:
    """A gzip bomb as a request body stays a few KB of bytes: nothing decompresses request
    bodies, so it is refused as what it is (bad JSON), fast and without memory."""
    bomb = gzip.compress(b"\0" * (50 << 20))
    assert len(bomb) < 100_000
    client = make_client()
    response = client.post("/api/show", content=bomb, headers={
        "Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert response.status_code == 400


def test_every_503_carries_retry_after(make_client: Callable[..., TestClient]) -> None:
    client = make_client()

    @client.app.get("/api/busy-test")  # type: ignore[misc]
    async def busy() -> None:
        raise ServerBusy()

    response = client.get("/api/busy-test")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "server busy" in response.json()["error"]


@pytest.mark.parametrize(("peer", "key"), [
    (("10.0.0.7", 51000), "10.0.0.7"),
    (("2a00:1450:4001:81a:aaaa::1", 51000, 0, 0), "2a00:1450:4001:81a::/64"),  # one host's
    (("2a00:1450:4001:81a:bbbb::9", 51000, 0, 0), "2a00:1450:4001:81a::/64"),  # whole /64
    (("::ffff:192.0.2.1", 51000, 0, 0), "192.0.2.1"),  # v4-mapped: the IPv4 address
    (("fe80::1%eth0", 51000, 0, 2), "fe80::1"),  # a LAN's hosts share a /64: one by one
    (("fd12:3456:789a:1::5", 51000, 0, 0), "fd12:3456:789a:1::5"),
    ("/run/pollama.sock", None),  # a unix socket peer is not counted
    (None, None),
])  # fmt: skip
def test_connections_are_counted_per_client_address(peer: object, key: str | None) -> None:
    assert client_key(peer) == key


# -- a real server, for sockets that misbehave ------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("limits-home")
    server = launch(home, "127.0.0.1", {
        "POLLAMA_HEADER_TIMEOUT": "1", "POLLAMA_CLIENT_TIMEOUT": "1", "POLLAMA_MAX_UPLOADS": "1"
    })  # fmt: skip
    yield server
    stop_server(server)


def _connect(server: RunningServer) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.slow
def test_slow_loris_connections_are_closed_and_others_served(limited: RunningServer) -> None:
    """Clients that trickle headers, or send none, are cut after POLLAMA_HEADER_TIMEOUT while
    ordinary requests keep being answered at once."""
    silent = [_connect(limited) for _ in range(15)]
    trickling = [_connect(limited) for _ in range(15)]
    for sock in trickling:
        sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    for _ in range(5):
        assert httpx.get(limited.url + "/api/tags", timeout=2).status_code == 200
    for _ in range(3):  # a byte every 0.3 s never completes the headers
        time.sleep(0.3)
        for sock in trickling:
            try:
                sock.sendall(b"a")
            except OSError:
                pass
    for sock in silent + trickling:
        data = _read_all(sock)  # returns once the server closes the connection
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
        sock.close()
    assert time.monotonic() - started < 5
    assert httpx.get(limited.url + "/api/tags", timeout=2).status_code == 200


@pytest.mark.slow
def test_a_stalled_body_gets_408(limited: RunningServer) -> None:
    sock = _connect(limited)
    sock.sendall(b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 100\r\n\r\n{\"model\":")  # fmt: skip
    started = time.monotonic()
    data = _read_all(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b"POLLAMA_CLIENT_TIMEOUT" in data
    assert 0.8 < time.monotonic() - started < 5


@pytest.mark.slow
def test_concurrent_uploads_are_capped(limited: RunningServer, tmp_path: Path) -> None:
    data = b"u" * 200_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    slow = _connect(limited)
    slow.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                 + data[:1000])  # fmt: skip
    time.sleep(0.2)
    other = b"v" * 1000
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    busy = httpx.post(f"{limited.url}/api/blobs/{other_digest}", content=other)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1" and "POLLAMA_MAX_UPLOADS" in busy.json()["error"]
    slow.sendall(data[1000:])
    assert _read_all(slow).startswith(b"HTTP/1.1 201")
    slow.close()
    assert httpx.post(f"{limited.url}/api/blobs/{other_digest}", content=other).status_code == 201
