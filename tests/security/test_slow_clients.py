"""Slow clients against a real server (issue point 7): a flood of half-sent request heads
from one address, a short deadline for heads, a cap per client address, and a total
deadline for bodies (with a minimum rate for uploads).

Loopback has a whole /8, so clients bind to 127.0.0.2 (the attacker) and 127.0.0.3 (an
ordinary client) to have different peer addresses. Every socket has a timeout, so a server
without these limits fails the tests instead of hanging them.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import RunningServer, stop_server

from .conftest import launch

pytestmark = pytest.mark.slow

ATTACKER, OTHER = "127.0.0.2", "127.0.0.3"
PARTIAL_HEAD = b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("slow-clients-home")
    server = launch(home, "127.0.0.1", {
        "POLLAMA_MAX_CONNECTIONS": "20",  # the setting: 20 half-sent heads held it all
        "POLLAMA_MAX_CONNECTIONS_PER_CLIENT": "10",
        "POLLAMA_HEADER_TIMEOUT": "2",
        "POLLAMA_BODY_TIMEOUT": "2",
        "POLLAMA_MIN_UPLOAD_RATE": "1000",
    })  # fmt: skip
    yield server
    stop_server(server)


def _connect(server: RunningServer, source: str) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=8, source_address=(source, 0))


def _answer(sock: socket.socket) -> bytes:
    """Everything until the server closes; a reset (refused before reading) is b"reset"."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data or b"reset"
    return data


def _get(server: RunningServer, source: str) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=3) as client:
        return client.get(server.url + "/api/tags")


def test_a_slow_header_flood_from_one_address_leaves_others_served(
    guarded: RunningServer,
) -> None:
    flood = [_connect(guarded, ATTACKER) for _ in range(30)]
    started = time.monotonic()
    for sock in flood:
        try:
            sock.sendall(PARTIAL_HEAD)
        except OSError:
            pass  # already refused and closed
    time.sleep(0.3)
    # Another client is served at once; the attacker's address has no room left.
    other = _get(guarded, OTHER)
    assert other.status_code == 200 and time.monotonic() - started < 2
    with _connect(guarded, ATTACKER) as one_more:  # it sends nothing: no reset, the 503
        refused_again = _answer(one_more)
    assert refused_again.startswith(b"HTTP/1.1 503"), refused_again
    assert b"retry-after: 1" in refused_again
    assert b"POLLAMA_MAX_CONNECTIONS_PER_CLIENT" in refused_again
    # 20 of the 30 were refused as they opened, 10 held until the header deadline (2 s).
    answers = []
    for sock in flood:
        answers.append((_answer(sock), time.monotonic() - started))
        sock.close()
    refused = [a for a, _ in answers if a == b"reset" or a.startswith(b"HTTP/1.1 503")]
    timed_out = [(a, t) for a, t in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(refused) == 20 and len(timed_out) == 10, answers
    assert all(1.5 < t < 4 for _, t in timed_out), timed_out
    # Closed connections are no longer counted: the attacker's address is served again.
    for _ in range(15):  # more than the cap, one after the other: nothing leaks
        assert _get(guarded, ATTACKER).status_code == 200


def test_a_body_must_arrive_within_the_body_timeout(guarded: RunningServer) -> None:
    """A byte every 0.3 s never trips the 30 s gap timeout; the 2 s total deadline does."""
    sock = _connect(guarded, OTHER)
    sock.sendall(b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
    started = time.monotonic()
    sock.settimeout(0.3)
    data = b""
    while not data and time.monotonic() - started < 6:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            sock.sendall(b" ")
    sock.settimeout(8)
    data += _answer(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b"POLLAMA_BODY_TIMEOUT" in data
    assert 1.8 < time.monotonic() - started < 4


def _upload(server: RunningServer, size: int, chunk: int, every: float) -> tuple[bytes, float]:
    data = b"u" * size
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    sock = _connect(server, OTHER)
    sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
    started = time.monotonic()
    sock.settimeout(every)
    answer, sent = b"", 0
    while not answer and time.monotonic() - started < 8:
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            if sent < size:
                sock.sendall(data[sent : sent + chunk])
                sent += chunk
    sock.settimeout(8)
    answer += _answer(sock)
    sock.close()
    return answer, time.monotonic() - started


def test_uploads_must_keep_a_minimum_rate(guarded: RunningServer) -> None:
    """2 s, then 1 s more per 1000 bytes received (POLLAMA_MIN_UPLOAD_RATE=1000)."""
    slow, seconds = _upload(guarded, 20_000, 100, 0.5)  # 200 bytes/s: cut at about 2.5 s
    assert slow.startswith(b"HTTP/1.1 408"), slow[:100]
    assert b"POLLAMA_MIN_UPLOAD_RATE" in slow and 2 < seconds < 4
    fast, seconds = _upload(guarded, 12_000, 2000, 0.5)  # 4000 bytes/s for 3 s: stays ahead
    assert fast.startswith(b"HTTP/1.1 201"), fast[:100]
    assert seconds > 2.5  # it ran past POLLAMA_BODY_TIMEOUT, which alone would have cut it
