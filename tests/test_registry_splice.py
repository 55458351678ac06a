"""Bodies moved from the socket to the file inside the kernel (:mod:`pollama.registry.spliced`):
what one move takes from the socket and leaves there, how it ends (the body's end, a
connection that ends early, a stall, a wakeup, a reset, a failing file), the socket that
:meth:`RawBody.hand_over` gives up (and does not over TLS), and pulls through a real registry
that take this path, are cut, resume and are verified.

Real loopback TCP connections throughout; the pulls go through :class:`FaultProxy` to Debian's
docker-registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import test_registry_download as downloads
from pollama.registry import TransferOptions, netstream, spliced
from pollama.registry.partial import PartialFile
from pollama.store import Store
from pollama.store.manifests import Manifest
from registry_helpers import Fault, FaultProxy
from test_registry import FAST, model_layer, run, service, strays
from test_registry_download import (
    ONE_PART,
    _self_signed,
    answering,
    client,
    read_head,
    serving,
    through,
)

pytestmark = pytest.mark.skipif(not spliced.AVAILABLE, reason="splice is Linux's")
store, model = downloads.store, downloads.model  # the download tests' fixtures


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(our end, non-blocking as asyncio leaves it; the peer's end) of a loopback connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    ours.setblocking(False)
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


@contextlib.contextmanager
def partial_file(tmp_path: Path) -> Iterator[PartialFile]:
    file = PartialFile(os.open(tmp_path / "blob-partial", os.O_RDWR | os.O_CREAT, 0o644))
    try:
        yield file
    finally:
        file.close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def send_later(peer: socket.socket, data: bytes, then_close: bool = False) -> threading.Thread:
    def send() -> None:
        peer.sendall(data)
        if then_close:
            peer.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# -- one move ---------------------------------------------------------------------------------


def test_a_move_takes_exactly_its_count_into_the_file_and_the_hash_sees_every_byte(
    tmp_path: Path,
) -> None:
    data, after = os.urandom(5 << 20), b"HTTP/1.1 200 OK\r\n"  # what follows the body stays
    reports: list[int] = []
    with tcp_pair() as (ours, peer), partial_file(tmp_path) as file:
        sender = send_later(peer, data + after)
        moved = spliced.move(
            ours.fileno(), file, 0, len(data), wakeup=spliced.Wakeup(), idle_timeout=5,
            report=reports.append,
        )  # fmt: skip
        sender.join()
        assert moved == len(data) == sum(reports)
        file.call(file.wait_hashed, len(data))
        assert file.digest() == sha256(data)  # handed to the hash as it landed, in order
        ours.setblocking(True)
        assert ours.recv(100) == after
    assert (tmp_path / "blob-partial").read_bytes() == data


def test_a_move_at_an_offset_writes_there_and_leaves_the_hash_to_the_read_back(
    tmp_path: Path,
) -> None:
    head, rest = os.urandom(1 << 20), os.urandom(2 << 20)
    with tcp_pair() as (ours, peer), partial_file(tmp_path) as file:
        send_later(peer, rest)
        moved = spliced.move(
            ours.fileno(), file, len(head), len(rest), wakeup=spliced.Wakeup(), idle_timeout=5,
            report=lambda _n: None,
        )  # fmt: skip
        assert moved == len(rest) and file.claimed == 0  # not the hash's next bytes
        file.call(file.write, [head], 0)
        file.claim(len(head) + len(rest))
        file.call(file.wait_hashed, len(head) + len(rest))
        assert file.digest() == sha256(head + rest)


def test_a_connection_that_ends_early_gives_what_arrived(tmp_path: Path) -> None:
    with tcp_pair() as (ours, peer), partial_file(tmp_path) as file:
        send_later(peer, b"x" * 1000, then_close=True)
        reports: list[int] = []
        moved = spliced.move(
            ours.fileno(), file, 0, 5000, wakeup=spliced.Wakeup(), idle_timeout=5,
            report=reports.append,
        )  # fmt: skip
        assert moved == sum(reports) == 1000
    assert (tmp_path / "blob-partial").read_bytes() == b"x" * 1000


def test_a_silent_connection_times_out_and_a_wakeup_ends_the_wait_at_once(
    tmp_path: Path,
) -> None:
    with tcp_pair() as (ours, peer), partial_file(tmp_path) as file:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            spliced.move(
                ours.fileno(), file, 0, 100, wakeup=spliced.Wakeup(), idle_timeout=0.2,
                report=lambda _n: None,
            )  # fmt: skip
        assert 0.15 < time.monotonic() - started < 2

        wakeup, reports, result = spliced.Wakeup(), [], []

        def moving() -> None:
            result.append(
                spliced.move(
                    ours.fileno(),
                    file,
                    0,
                    10_000,
                    wakeup=wakeup,
                    idle_timeout=60,
                    report=reports.append,
                )  # fmt: skip
            )

        thread = threading.Thread(target=moving)
        thread.start()
        peer.sendall(b"y" * 300)
        deadline = time.monotonic() + 5
        while sum(reports) < 300 and time.monotonic() < deadline:  # reported while it waits
            time.sleep(0.01)
        assert sum(reports) == 300
        stopped = time.monotonic()
        wakeup.set()
        thread.join(timeout=5)
        assert not thread.is_alive() and time.monotonic() - stopped < 1
        assert result == [300]
        wakeup.close()


def test_a_reset_connection_is_a_read_error_and_a_failing_file_stays_an_os_error(
    tmp_path: Path,
) -> None:
    with tcp_pair() as (ours, peer), partial_file(tmp_path) as file:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset, not an end
        time.sleep(0.05)
        with pytest.raises(httpx.ReadError):
            spliced.move(
                ours.fileno(), file, 0, 100, wakeup=spliced.Wakeup(), idle_timeout=5,
                report=lambda _n: None,
            )  # fmt: skip
    with tcp_pair() as (ours, peer), partial_file(tmp_path) as file:
        file.close()
        peer.sendall(b"z" * 100)
        with pytest.raises(OSError, match="closed") as caught:
            spliced.move(
                ours.fileno(), file, 0, 100, wakeup=spliced.Wakeup(), idle_timeout=5,
                report=lambda _n: None,
            )  # fmt: skip
        assert not isinstance(caught.value, httpx.TransportError)


# -- the socket a body gives up ---------------------------------------------------------------


def test_a_handed_over_socket_has_one_reader_and_keeps_what_was_received_first() -> None:
    body = os.urandom(3 << 20)
    go, done = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        writer.write(body[:1000])  # arrives (and is queued) before the hand-over
        await writer.drain()
        await go.wait()
        writer.write(body[1000:])
        await writer.drain()
        await done.wait()

    def read_rest(fd: int, size: int) -> bytes:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.setblocking(True)
            data = b""
            while len(data) < size and (chunk := sock.recv(size - len(data))):
                data += chunk
            return data

    async def main() -> None:
        async with serving(handler) as port, client() as http:
            async with http.stream("GET", f"http://127.0.0.1:{port}/big") as response:
                raw = netstream.raw_body(response)
                assert raw is not None
                await asyncio.sleep(0.2)
                handed = raw.hand_over()
                assert handed is not None
                fd, received, left = handed
                first = b"".join(received)
                assert body.startswith(first) and len(first) >= 1000
                assert left == len(body) - len(first)  # what the taker may read, no more
                go.set()
                await asyncio.sleep(0.2)  # the event loop runs: the transport reads nothing
                rest = await asyncio.to_thread(read_rest, fd, len(body) - len(first))
                assert first + rest == body
                done.set()

    asyncio.run(main())


def test_a_body_waits_in_the_socket_until_it_is_read() -> None:
    """A response whose body nobody reads yet (the next part's, asked for ahead) is not
    received into Python meanwhile; reading it then gets all of it."""
    body = os.urandom(8 << 20)
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await done.wait()

    async def main() -> None:
        async with serving(handler) as port, client() as http:
            async with http.stream("GET", f"http://127.0.0.1:{port}/big") as response:
                await asyncio.sleep(0.3)  # the server has sent all it could meanwhile
                stream = response.extensions["network_stream"]
                assert isinstance(stream, netstream._Stream)
                assert stream._pipe.queued <= 256 << 10  # what came with the head at most
                assert await response.aread() == body
            done.set()

    asyncio.run(main())


def test_an_idle_connection_the_server_closed_after_a_bodiless_answer_is_not_reused() -> None:
    """After a HEAD (no body to read, so the transport stays paused at the head's end) the
    pool still sees that the server closed the connection, and asks on a new one."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        if not head.startswith(b"HEAD"):
            writer.write(b"hello")
        await writer.drain()
        # then the server closes it: an idle connection it no longer keeps

    async def main() -> None:
        async with serving(handler) as port, client() as http:
            url = f"http://127.0.0.1:{port}/blob"
            assert (await http.head(url)).headers["content-length"] == "5"
            await asyncio.sleep(0.2)
            assert (await http.get(url)).content == b"hello"
            assert connections == 2

    asyncio.run(main())


def test_a_tls_body_is_never_handed_over(tmp_path: Path) -> None:
    server_context, trusting = _self_signed(tmp_path)
    body = os.urandom(1 << 20)

    async def main() -> None:
        async with serving(answering(body), server_context) as port:
            stream = await netstream.connect("127.0.0.1", port, timeout=5)
            tls = await stream.start_tls(trusting, server_hostname="localhost", timeout=5)
            await tls.write(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n", timeout=5)
            head = b""
            while not head.endswith(b"\r\n\r\n"):  # a read stops at the end of the head
                head += await tls.read(65536, timeout=5)
            assert isinstance(tls, netstream._Stream) and tls.at_body
            raw = netstream.RawBody(tls, len(body))
            assert raw.hand_over() is None  # the socket carries records, not the body
            buffer = memoryview(bytearray(len(body)))
            got = 0
            while got < len(body) and (n := await raw.fill(buffer[got:], len(body) - got, 5)):
                got += n
            assert bytes(buffer) == body
            await tls.aclose()

    asyncio.run(main())


# -- pulls ------------------------------------------------------------------------------------


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes each :func:`spliced.move` of the model's layer moved (the test model's
    other blobs are under a kilobyte; they are moved too, and not counted here)."""
    moved: list[int] = []
    real = spliced.move

    def counting(sock: int, file: PartialFile, offset: int, count: int, **kwargs: Any) -> int:
        result = real(sock, file, offset, count, **kwargs)
        if count > 1024:
            moved.append(result)
        return result

    monkeypatch.setattr(spliced, "move", counting)
    return moved


@pytest.mark.parametrize("opts", [FAST, ONE_PART], ids=["parts", "one-part"])
def test_a_plain_http_pull_moves_its_bodies_in_the_kernel_and_verifies_them(
    proxy: FaultProxy,
    store: Store,
    tmp_path: Path,
    model: Manifest,
    opts: TransferOptions,
    moves: list[int],
) -> None:
    layer = model_layer(model)
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"}
    assert set(store.blobs.digests()) == model.digests() and strays(store) == []
    data = store.blobs.path(layer.digest).read_bytes()
    assert sha256(data) == layer.digest
    # Each part but what the connection had received before it was handed over (more of a
    # small part than of a large one).
    assert len(moves) > 1 if opts is FAST else layer.size // 2 < sum(moves) <= layer.size


def pulled_without_moves(
    proxy: FaultProxy, store: Store, tmp: Path, model: Manifest, moves: list[int],
    opts: TransferOptions,
) -> None:  # fmt: skip
    """A pull succeeds with every body read on the event loop."""
    items = run(service(store, tmp, opts).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"} and moves == []
    assert set(store.blobs.digests()) == model.digests()


def test_splicing_can_be_turned_off(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, moves: list[int]
) -> None:
    pulled_without_moves(proxy, store, tmp_path, model, moves, TransferOptions(splice=False))


def test_a_spliced_part_that_is_cut_resumes_from_the_bytes_in_the_file(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, moves: list[int]
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="drop", after=layer.size // 3, times=1))
    items = run(service(store, tmp_path, ONE_PART).pull(through(proxy), insecure=True))
    assert items[-1] == {"status": "success"}
    assert sha256(store.blobs.path(layer.digest).read_bytes()) == layer.digest
    assert len(moves) >= 2  # the cut, then the rest
    assert proxy.blob_bytes() < layer.size * 1.5  # the rest, not all of it again


def test_a_corrupted_spliced_body_installs_nothing(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, moves: list[int]
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="corrupt", after=layer.size // 2, times=None))
    with pytest.raises(Exception, match="digest mismatch|sha256"):
        run(service(store, tmp_path, ONE_PART).pull(through(proxy), insecure=True))
    assert moves and not store.blobs.exists(layer.digest)


def test_a_pull_left_mid_move_stops_its_thread_at_once(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, moves: list[int]
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=200_000, times=None))
    opts = TransferOptions(stall_timeout=60)  # a stall would not end the move: the leaving must
    svc = service(store, tmp_path, opts)

    async def leave_early() -> float:
        events = svc.pull(through(proxy), insecure=True)
        async for item in events:
            if item.digest == layer.digest and item.completed > 100_000:  # moving by now
                break
        started = time.monotonic()
        await events.aclose()  # the client goes away
        while svc.downloads.active():
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    assert asyncio.run(leave_early()) < 1
    assert len(moves) == 1 and 0 < moves[0] < layer.size  # the move returned what it had
    assert spliced._movers_free._value == spliced.MAX_MOVERS  # type: ignore[attr-defined]
    assert not store.blobs.exists(layer.digest)
    assert any(name.endswith("-partial") for name in strays(store))


def test_the_progress_of_a_slow_spliced_body_is_reported_as_it_comes(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, moves: list[int]
) -> None:
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="throttle", rate=1_000_000, times=None))
    opts = TransferOptions(progress_interval=0.05, stall_timeout=5)
    items = run(service(store, tmp_path, opts).pull(through(proxy), insecure=True))
    done = [i.get("completed", 0) for i in items if i.get("digest") == layer.digest]
    assert moves and len(set(done)) >= 5  # many steps, not one at the end
    assert done == sorted(done) and done[-1] == layer.size


def test_a_part_that_finds_every_mover_busy_is_read_on_the_event_loop(
    proxy: FaultProxy,
    store: Store,
    tmp_path: Path,
    model: Manifest,
    moves: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threads are bounded: with no mover free a part does not wait for one."""
    none_free = threading.BoundedSemaphore(1)
    none_free.acquire()
    monkeypatch.setattr(spliced, "_movers_free", none_free)
    pulled_without_moves(proxy, store, tmp_path, model, moves, ONE_PART)


def test_every_move_gives_its_mover_back(
    proxy: FaultProxy, store: Store, tmp_path: Path, model: Manifest, moves: list[int]
) -> None:
    """After a pull of many parts, one of them cut and fetched again, every slot is free."""
    layer = model_layer(model)
    proxy.add(Fault(path=layer.digest, action="drop", after=layer.size // 3, times=1))
    run(service(store, tmp_path, FAST).pull(through(proxy), insecure=True))
    assert moves and spliced._movers_free._value == spliced.MAX_MOVERS  # type: ignore[attr-defined]
